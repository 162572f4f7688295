"""
Dual-mask GPT: one GPT-2-style network trained on the forward task (causal mask, predict the next token)
and, with probability p_bw, on the backward task (anti-causal mask, predict the previous token).
The task is announced by a special token, as in UL2 and the seed ("mask"): FW at the start of the text for
the forward task, BW at the end of the text for the backward task.

    fw:  [FW, x0, ..., x_{T-1}]  positions 0, 1, ..., T      causal (tril)       logit at x_i -> x_{i+1}
    bw:  [x0, ..., x_{T-1}, BW]  positions T, ..., 1, 0      anti-causal (triu)  logit at x_i -> x_{i-1}

    idx (B, T) -> add task token (B, T+1) -> wte + wpe -> n_layer x Block(mask) -> ln_f -> @ wte.T
               -> drop the task token's row -> logits (B, T, V)

The loss: forward(idx, targets, direction) returns the logits and the plain loss, masked_cross_entropy on all
(B, T, V) logits (for users and tests). Training does not call it: the trainer calls training_loss() (below: fw,
and bw with probability p_bw), whose lm_loss(..., direction=d) (auto_regressive_model.py) computes each task's
loss and gradient with the chunked head, chunked_cross_entropy, a few rows of logits at a time: all of them would
take gigabytes with GPT-2's 50k tokens (tests/test_loss_paths.py checks that both agree).

Task tokens: FW = vocab_size - 2 and BW = vocab_size - 1 (EXTRA_TOKENS = 2; the trainer reserves them on
top of the tokenizer's ids). The model adds the token itself, so idx is plain text in both directions and
logits come back for every position of idx.

Positions and block_size: block_size counts text tokens (= the trainer's --seq-len). The task token is an
extra slot, so the network sees up to block_size + 1 positions and wpe has block_size + 1 rows. Positions are
learned and counted from the task token in reading order (fw: left to right, bw: right to left). The two
directions are then exact mirror images: bw on x is fw on reversed(x) with BW instead of FW, so the same
weights, positions included, serve both tasks and the task token is the only thing that tells them apart.
Leak-free by construction: fw logits at i depend only on idx[:, :i+1] (causal mask, position i+1); bw logits
at i depend only on idx[:, i:] (anti-causal mask; its position T-i is the length of that suffix).
Options (components.py): pos = learned | sinusoidal | alibi | none, head = tied | clap | clap-cosine. With
pos=alibi there is no wpe: the fw direction adds the causal ALiBi bias (-m * (i - j) for keys j <= i) and the bw direction
its mirror image (-m * (j - i) for keys j >= i), so the mirror property above holds for every option.
Sinusoidal and rotary positions (pos=rope: q and k rotated inside attention) use the same mirrored position
numbers as the learned ones. Other switches as baseline_gpt2: norm, mlp, qk_norm, zero_init_proj.
key_mask (B, T) marks filler tokens of idx; the task token is always attendable.

The seed's backward mask, tril(ones).flip(0), is not anti-causal (its first row sees every position); here it
is components.attention_mask("anticausal") == triu, and tests/test_dual_mask_gpt.py proves it.

Logged: each train row's "loss" is the fw loss (also on steps that train bw; an exclusive bw step computes
it without gradients), "loss_bw" is there on the steps that ran bw, "bw_ran" says which (plot_loss.py
--fields loss loss_bw). Val rows: "loss" = "loss_fw", and "loss_bw".
Training (training_loss): every step the fw loss; with probability p_bw
    bw_mode="additional" (the seed's): the same tokens also get the bw loss, summed before one backward pass;
    bw_mode="exclusive" (the seed's untried variant): the step does the bw task instead of the fw one.
The coin of step s is random.Random(bw_seed * 1_000_003 + s), so all DDP ranks and a resumed run agree; every
micro-batch of a step takes the same direction(s). dynamic_p_bw=True is the seed code's adjustment: after a
step that ran bw, p_bw = clamp(ppl_bw / ppl_fw, 0.01, 1) (bw less often when it is easier), with the losses
averaged over micro-batches and, under DDP, over ranks; p_bw is then only the starting value.
For the bw task on a window z[0..T] the loader's x = z[:-1], y = z[1:] swap roles: input y, targets x.
"""

import copy
import math
import random
from dataclasses import dataclass

import torch
import torch.nn as nn

from auto_regressive_model import (AutoRegressiveModel, ModelConfigError, check_options, check_positive,
                                   masked_cross_entropy, masked_mean)
from components import Block, KVCache, OutputHead, PositionEmbedding, block_options, init_gpt2_weights, make_norm

EXTRA_TOKENS = 2          # FW = vocab_size - 2, BW = vocab_size - 1
BW_MODES = ("additional", "exclusive")
DIRECTIONS = ("fw", "bw")
CHOICES = {"bw_mode": BW_MODES}   # --help lists them (the shared options' are in models/__init__.py)


@dataclass
class Config:
    vocab_size: int = 50304   # GPT-2's 50257 + FW + BW, rounded up to a multiple of 64
    block_size: int = 256     # longest text (the task token comes on top)
    n_layer: int = 8          # the seed's default depth
    n_head: int = 6
    n_embd: int = 384         # the seed's default width
    dropout: float = 0.0
    p_bw: float = 0.05        # probability of the backward task per step (the starting value if dynamic)
    bw_mode: str = "additional"   # additional: fw + bw on the same tokens; exclusive: fw or bw
    dynamic_p_bw: bool = False    # the seed code's p_bw = clamp(ppl_bw / ppl_fw, 0.01, 1) after each bw step
    bw_seed: int = 0          # seeds the per-step coin
    pos: str = "learned"      # learned | sinusoidal | alibi | none | rope
    head: str = "tied"        # tied | clap | clap-cosine
    norm: str = "layer"       # layer | rms (nn.RMSNorm)
    mlp: str = "gelu"         # gelu | relu2 | swiglu (2/3 hidden width: about the same weights)
    qk_norm: bool = False     # RMSNorm on q and k of every head
    zero_init_proj: bool = False  # residual-branch output projections start at zero (blocks start as identity)


PRESETS = {
    "rtx3080": dict(n_layer=8, n_head=6, n_embd=384, block_size=256),
    "tiny": dict(n_layer=4, n_head=4, n_embd=64, block_size=128),
}


def check_config(config):
    check_positive(config, "block_size", "n_layer", "n_head", "n_embd")
    if config.vocab_size <= EXTRA_TOKENS:
        raise ModelConfigError(f"vocab_size ({config.vocab_size}) must be above {EXTRA_TOKENS} (the task tokens)")
    if config.n_embd % config.n_head != 0:
        raise ModelConfigError(f"n_embd ({config.n_embd}) must be a multiple of n_head ({config.n_head})")
    if config.bw_mode not in BW_MODES:
        raise ModelConfigError(f"bw_mode {config.bw_mode!r} unknown; choose one of: {', '.join(BW_MODES)}")
    if not 0.0 <= config.p_bw <= 1.0:
        raise ModelConfigError(f"p_bw ({config.p_bw}) must lie in [0, 1]")
    check_options(config)


def bw_coin(bw_seed, step):
    """The uniform number in [0, 1) that decides step `step`'s direction(s); identical on every rank."""
    return random.Random(bw_seed * 1_000_003 + step).random()


class Model(AutoRegressiveModel):
    supports_kv_cache = True   # for the fw direction (generation)

    def __init__(self, config):
        super().__init__()
        check_config(config)
        self.config = config
        self.fw_token = config.vocab_size - 2
        self.bw_token = config.vocab_size - 1
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        self.wpe = PositionEmbedding(config.pos, config.block_size + 1, config.n_embd)  # + 1: the task token
        alibi = "symmetric" if config.pos == "alibi" else None   # (the variant matters for bidirectional only)
        self.blocks = nn.ModuleList(Block(config.n_embd, config.n_head, config.dropout, alibi, **block_options(config))
                                    for _ in range(config.n_layer))
        self.ln_f = make_norm(config.norm, config.n_embd)
        self.head = OutputHead(config.head)                   # tied to wte; no weights of its own but beta
        self.apply(lambda m: init_gpt2_weights(m, config.n_layer, config.zero_init_proj))
        self.p_bw_now = float(config.p_bw)   # changes only with dynamic_p_bw
        self._reset_dynamic_sums()
        self._last_fw_loss = None

    # ---- the network --------------------------------------------------------------------
    def add_task_token(self, idx, direction):
        """(B, T) text -> (B, T+1) with FW in front (fw) or BW behind (bw)."""
        token = torch.full_like(idx[:, :1], self.fw_token if direction == "fw" else self.bw_token)
        return torch.cat([token, idx], dim=1) if direction == "fw" else torch.cat([idx, token], dim=1)

    def features(self, idx, direction="fw", key_mask=None, cache=None):
        """idx (B, T) -> final hidden states (B, T, C) after ln_f, one row per idx position (the task token's
        row dropped). key_mask (B, T) bool, True = attendable; the task token always is."""
        if direction not in DIRECTIONS:
            raise ValueError(f"direction must be 'fw' or 'bw', not {direction!r}")
        B, T = idx.size()
        if cache is not None:              # key_mask: the prompt's left padding (see the KV cache section)
            assert direction == "fw", "the KV cache serves fw generation only"
            start = cache.pos
            if start == 0:
                idx, key_mask = self.add_fw_token_after_padding(idx, key_mask)
            pos = cache.add_tokens(idx.size(1), key_mask)     # (B, T'): per-row positions, FW at 0
            key_mask = None                                   # the attention reads it from the cache
        else:
            idx = self.add_task_token(idx, direction)                 # (B, T+1)
            pos = torch.arange(T + 1, device=idx.device)              # (T+1,)
            if direction == "bw":
                pos = pos.flip(0)          # distance from BW: T, T-1, ..., 0
            if key_mask is not None:       # the task token's slot is always attendable
                task = torch.ones_like(key_mask[:, :1], dtype=torch.bool)
                parts = [task, key_mask.bool()] if direction == "fw" else [key_mask.bool(), task]
                key_mask = torch.cat(parts, dim=1)
        last = int(pos.max()) if cache is not None else T
        assert last < self.wpe.max_positions, f"text length {last} > block_size {self.config.block_size}"
        x = self.head.embed(self.wte, idx) + self.wpe(pos)           # (B, T+1, C) (a cache: its new columns)
        mask = "causal" if direction == "fw" else "anticausal"
        for i, block in enumerate(self.blocks):
            x = block(x, mask, cache, slot=i, key_mask=key_mask, pos=pos)
        if cache is not None:
            cache.advance(idx.size(1))
            if start == 0:
                x = x[:, 1:]
        elif direction == "fw":
            x = x[:, 1:]                   # drop FW's row: (B, T, C)
        else:
            x = x[:, :-1]                  # drop BW's row: (B, T, C)
        return self.ln_f(x)

    def forward(self, idx, targets=None, direction="fw", cache=None, key_mask=None):
        """logits (B, T, V) for every position of idx, and the loss against targets (aligned per position:
        the next token for fw, the previous one for bw; -1 ignored) or None."""
        logits = self.head(self.features(idx, direction, key_mask, cache), self.wte.weight)  # (B, T, V)
        loss = masked_cross_entropy(logits, targets) if targets is not None else None  # the plain loss, a scalar
        return logits, loss

    # ---- the KV cache (fw generation) ----------------------------------------------------
    def add_fw_token_after_padding(self, idx, key_mask=None):
        """The first chunk fed to a cache: FW goes right before each row's first real token, after its left
        padding (key_mask False), so that its position and its ALiBi distances are those of an unpadded row.
        Returns (B, T+1) tokens and their key mask (or None without padding)."""
        if key_mask is None:
            return self.add_task_token(idx, "fw"), None
        n_pad = (~key_mask).long().sum(dim=1)                  # (B,): FW's column in the longer row
        rows = torch.arange(idx.size(0), device=idx.device)
        idx = torch.cat([torch.zeros_like(idx[:, :1]), idx], dim=1)
        key_mask = torch.cat([torch.zeros_like(key_mask[:, :1]), key_mask.bool()], dim=1)
        idx[rows, n_pad] = self.fw_token
        key_mask[rows, n_pad] = True
        return idx, key_mask

    def forward_cached(self, idx, cache, key_mask=None):
        return self(idx, cache=cache, key_mask=key_mask)[0]

    def new_cache(self, batch_size, device, dtype, extra_columns=0):
        c = self.config
        return KVCache(len(self.blocks), batch_size, c.n_head, c.block_size + 1 + extra_columns,
                       c.n_embd // c.n_head, device, dtype)

    def keep_first_blocks(self, k):
        """Layer cut: keep blocks 0..k-1 (ln_f and the head stay), in place; returns self."""
        if not 1 <= k <= len(self.blocks):
            raise ValueError(f"k must lie in 1..{len(self.blocks)}, not {k}")
        self.blocks = nn.ModuleList(list(self.blocks)[:k])
        return self

    # ---- the two tasks on one loader batch ----------------------------------------------
    @staticmethod
    def bw_batch(x, y, loss_mask=None):
        """The bw task on the window z = x | y[-1]: input y, target x (the previous token of each y).
        The loss mask follows the predicted token: x[i] was y[i-1]'s target, so mask[:, i-1] (x[0]: mask[:, 0])."""
        mask = None if loss_mask is None else torch.cat([loss_mask[:, :1], loss_mask[:, :-1]], dim=1)
        return y, x, mask

    def directions_for_step(self, step):
        """The tasks step `step` runs: ("fw",), ("fw", "bw") or ("bw",)."""
        p = self.p_bw_now
        run_bw = p > 0 and bw_coin(self.config.bw_seed, step) < p
        if self.config.bw_mode == "exclusive":
            return ("bw",) if run_bw else ("fw",)
        return ("fw", "bw") if run_bw else ("fw",)

    def training_loss(self, x, y, loss_mask=None, step=0):
        """Metrics stay tensors on the device (no GPU sync per micro-step); the trainer reads them once."""
        losses, metrics = [], {}
        for d in self.directions_for_step(step):
            inp, tgt, mask = (x, y, loss_mask) if d == "fw" else self.bw_batch(x, y, loss_mask)
            loss, acc = self.lm_loss(inp, tgt, mask, with_accuracy=True, direction=d)  # the chunked head
            losses.append(loss)
            metrics[f"loss_{d}"] = loss.detach()
            metrics[f"acc_{d}"] = acc
            self._sums[f"{d}_sum"] += metrics[f"loss_{d}"]
            self._sums[f"{d}_n"] += 1
        if "loss_fw" not in metrics:  # an exclusive bw step: the fw loss, for the log only
            with torch.no_grad():
                metrics["loss_fw"] = masked_cross_entropy(self(x)[0], y, loss_mask).item()
        metrics["bw_ran"] = float("loss_bw" in metrics)
        # The logged "loss" is the fw loss on every row (the trained sum would jump on bw steps); bw: "loss_bw".
        metrics["loss"] = metrics["loss_fw"]
        return sum(losses), metrics

    @torch.no_grad()
    def evaluation_losses(self, x, y, loss_mask=None):
        out = {}
        for d in DIRECTIONS:
            inp, tgt, mask = (x, y, loss_mask) if d == "fw" else self.bw_batch(x, y, loss_mask)
            losses, hits = self.lm_token_losses(inp, tgt, direction=d)
            out[f"loss_{d}"] = masked_mean(losses, tgt, mask)
            out[f"acc_{d}"] = masked_mean(hits, tgt, mask)
        out["loss"] = out["loss_fw"]
        return out

    # ---- dynamic p_bw ----------------------------------------------------------------------
    def _reset_dynamic_sums(self):
        self._sums = {"fw_sum": 0.0, "fw_n": 0, "bw_sum": 0.0, "bw_n": 0}

    def on_train_step(self, step, max_steps):
        """Once per optimizer step: with dynamic_p_bw, p_bw = clamp(ppl_bw / ppl_fw, 0.01, 1) if bw ran."""
        if not self.config.dynamic_p_bw:
            self._reset_dynamic_sums()
            return False
        s = self._sums
        vals = [float(s["fw_sum"]), s["fw_n"], float(s["bw_sum"]), s["bw_n"]]  # one sync, once per step
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            t = torch.tensor(vals, dtype=torch.float64, device=self.wte.weight.device)
            torch.distributed.all_reduce(t)          # every rank ends with the same p_bw
            vals = t.tolist()
        fw_sum, fw_n, bw_sum, bw_n = vals
        if fw_n > 0:
            self._last_fw_loss = fw_sum / fw_n
        if bw_n > 0 and self._last_fw_loss is not None:
            ratio = math.exp(min(bw_sum / bw_n - self._last_fw_loss, 50.0))  # ppl_bw / ppl_fw
            self.p_bw_now = max(min(1.0, ratio), 0.01)
        self._reset_dynamic_sums()
        return False

    def extra_state(self):
        return {"p_bw_now": self.p_bw_now, "last_fw_loss": self._last_fw_loss, "sums": {k: float(v) for k, v in self._sums.items()}}

    def load_extra_state(self, state):
        self.p_bw_now = float(state.get("p_bw_now", self.config.p_bw))
        self._last_fw_loss = state.get("last_fw_loss")
        self._sums = dict(state.get("sums", self._sums))

    def memory_probe_model(self):
        """A copy whose every step runs bw too (bw_mode additional: fw and bw in one backward pass)."""
        probe = copy.deepcopy(self)
        probe.p_bw_now = 1.0
        return probe

    def log_fields(self):
        return {"p_bw": self.p_bw_now} if self.config.dynamic_p_bw else {}
