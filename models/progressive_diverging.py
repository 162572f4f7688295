"""
Progressive diverging GPT: a GPT-2 of n_layer (12) layer applications whose blocks start fully shared
and diverge in three stages, so that early training updates few parameters and late training many.

    idx (B, T) -> wte (B, T, C) + wpe (T, C) -> 12 block applications -> ln_f -> @ wte.T -> logits (B, T, V)

The loss: forward(idx, targets) returns the logits and the plain loss, masked_cross_entropy on all (B, T, V)
logits (for users and tests). Training does not call it: the trainer calls training_loss()
(auto_regressive_model.py), which computes the same loss and gradient with the chunked head,
chunked_cross_entropy, a few rows of logits at a time: all of them would take gigabytes with GPT-2's 50k tokens
(tests/test_loss_paths.py checks that both agree).

Which block serves layer application a = 0..11:
    stage 1:  3 blocks, each applied 4 times in a row     a -> block a // 4    (all weights train)
    stage 2:  6 blocks, each applied twice                a -> block a // 2
    stage 3: 12 blocks, one per application               a -> block a

set_stage(k + 1) builds stage k + 1 out of stage k and does not change the function the model computes:
    1 -> 2: block i is a copy of stage-1 block i // 2. Its attention projections (c_attn, c_proj) become
            LoRALinear: W and b frozen, y = W x + b + (alpha / r) * B A x with A (r, in) random and B (out, r)
            zero, so the copy computes what the original did. LayerNorms and MLP keep training normally.
    2 -> 3: block i is a copy of stage-2 block i // 2 whose LoRA is merged into its frozen weight
            (W <- W + (alpha / r) B A), then wrapped in a fresh LoRA (B zero) again.
The trainer calls on_train_step(step, max_steps) before every optimizer step. At step round(stage2_at *
max_steps) and round(stage3_at * max_steps) it moves to the next stage and returns True, and the trainer
rebuilds AdamW over exactly the parameters that now require grad. (The seed created its new blocks inside
forward(), after the optimizer was built, so they never trained.) The stage is in every metrics row and in
every checkpoint; load_extra_state() rebuilds the stage's structure before the weights are loaded.
A fine-tune (finetune.py, train_mntp.py) sets grows = False: it trains the checkpoint's stage as it is (its own
max_steps would otherwise start the schedule again, and its LoRA wraps the layers of that stage).

Options as baseline_gpt2 (components.py): pos = learned | sinusoidal | alibi | none | rope, head = tied | clap | clap-cosine,
attention = causal | bidirectional (an encoder: no generate()), alibi_bidirectional = shifted | symmetric,
norm = layer | rms, mlp = gelu | relu2 | swiglu, qk_norm, zero_init_proj (the QK-norm gains are copied with
their block and keep training, as the norms do).
Stages copy whole blocks, so an ALiBi model stays an ALiBi model in every stage.

prepare_for_inference() merges every LoRA into its weight: a trained model costs what a plain 12-layer GPT
costs. Generation keeps one KV cache slot per layer application (12), shared blocks included.

Training cost: stage 1 computes what the baseline computes but updates a quarter of the block weights;
in stages 2 and 3 the frozen attention weights need no weight gradient (a third of the blocks' weight-gradient
matmuls), which pays for the rank-r LoRA matmuls (_LoRAMatmul). bench/progressive_diverging.py times a
training step of each stage against baseline_gpt2: every stage within a few percent of it.
"""

import copy
from dataclasses import dataclass

import torch
import torch.nn as nn

from auto_regressive_model import (AutoRegressiveModel, ModelConfigError, check_options, check_positive,
                                   masked_cross_entropy)
from components import (Block, KVCache, LoRALinear, OutputHead, PositionEmbedding, block_options, embed_tokens,
                        init_gpt2_weights, make_norm, merge_lora)


@dataclass
class Config:
    vocab_size: int = 50304   # GPT-2's 50257 rounded up to a multiple of 64
    block_size: int = 256     # longest context
    n_layer: int = 12         # layer applications (a multiple of 4: stage 1 has n_layer / 4 blocks)
    n_head: int = 6
    n_embd: int = 192
    dropout: float = 0.0
    stage2_at: float = 1 / 3  # fraction of max_steps at which stage 2 starts
    stage3_at: float = 2 / 3  # ... and stage 3
    lora_rank: int = 8
    lora_alpha: float = 16.0  # the LoRA update is scaled by lora_alpha / lora_rank
    pos: str = "learned"      # learned | sinusoidal | alibi | none | rope
    head: str = "tied"        # tied | clap | clap-cosine
    attention: str = "causal"  # causal | bidirectional (an encoder: no generate())
    alibi_bidirectional: str = "shifted"  # ALiBi under bidirectional attention: shifted (the seed's) | symmetric
    norm: str = "layer"       # layer | rms (nn.RMSNorm)
    mlp: str = "gelu"         # gelu | relu2 | swiglu (2/3 hidden width: about the same weights)
    qk_norm: bool = False     # RMSNorm on q and k of every head
    zero_init_proj: bool = False  # residual-branch output projections start at zero (blocks start as identity)


PRESETS = {
    "rtx3080": dict(n_layer=12, n_head=6, n_embd=192, block_size=256),  # the baseline's depth and width
    "tiny": dict(n_layer=12, n_head=4, n_embd=128, block_size=128),
}


def check_sizes(config):
    c = config
    check_positive(c, "vocab_size", "block_size", "n_layer", "n_head", "n_embd", "lora_rank")
    if c.n_embd % c.n_head != 0:
        raise ModelConfigError(f"n_embd ({c.n_embd}) must be a multiple of n_head ({c.n_head})")
    if c.lora_rank > c.n_embd:  # a rank above the width adds weights but no directions
        raise ModelConfigError(f"lora_rank ({c.lora_rank}) must be at most n_embd ({c.n_embd})")
    if c.n_layer % 4 != 0:
        raise ModelConfigError(f"n_layer ({c.n_layer}) must be a multiple of 4: stage 1 applies each block "
                               f"4 times")
    if not 0.0 <= c.stage2_at <= c.stage3_at <= 1.0:
        raise ModelConfigError(f"need 0 <= stage2_at ({c.stage2_at}) <= stage3_at ({c.stage3_at}) <= 1")
    check_options(c)


class _LoRAMatmul(torch.autograd.Function):
    """y = x (W + s B A)^T + b for x (N, in), W and b frozen; gradients for x, A and B only.
    The forward and dx each take one matmul with the summed weight, as a plain nn.Linear does; the frozen W
    needs no weight gradient (the big saving), and A, B get theirs from skinny rank-r matmuls:
        u = x A^T (N, r),   dA = s (dy B)^T x,   dB = s dy^T u.
    (Autograd through base(x) + s B(A x) costs more: two extra passes over the (N, out) activations, and
    its rank-r weight gradients come out in a memory layout that is as slow as a full one on a CPU.)"""

    @staticmethod
    def forward(ctx, x, W, b, A, B, scale):
        W_eff = torch.addmm(W, B, A, alpha=scale).to(x.dtype)  # (out, in): summed in fp32, then cast
        A, B = A.to(x.dtype), B.to(x.dtype)
        y = x @ W_eff.t() if b is None else torch.addmm(b.to(x.dtype), x, W_eff.t())
        ctx.save_for_backward(x, W_eff, A, B, x @ A.t())
        ctx.scale = scale
        return y

    @staticmethod
    def backward(ctx, dy):
        x, W_eff, A, B, u = ctx.saved_tensors
        need_x, _, _, need_A, need_B, _ = ctx.needs_input_grad
        dx = dy @ W_eff if need_x else None                                # (N, in), LoRA path included
        dA = (B.t() @ dy.t()).mul_(ctx.scale) @ x if need_A else None      # (r, N) @ (N, in)
        dB = (u.t() @ dy).t().mul_(ctx.scale) if need_B else None          # (out, r)
        return dx, None, None, dA, dB, None


class LoRAProjection(LoRALinear):
    """components.LoRALinear (same parameters, same merge, same function W x + b + (alpha/r) B A x)
    with a cheaper training step, see _LoRAMatmul. Under autocast it computes in the autocast dtype."""

    def forward(self, x):
        dtype, device = x.dtype, x.device.type
        if torch.is_autocast_enabled(device):
            dtype = torch.get_autocast_dtype(device)
        with torch.autocast(device, enabled=False):  # the Function casts by itself
            y = _LoRAMatmul.apply(x.reshape(-1, x.size(-1)).to(dtype), self.base.weight, self.base.bias,
                                  self.lora_A, self.lora_B, self.scale)
        return y.view(*x.shape[:-1], y.size(-1))


class Model(AutoRegressiveModel):
    supports_kv_cache = True   # per instance: False when bidirectional

    def __init__(self, config):
        super().__init__()
        check_sizes(config)
        self.config = config
        self.stage = 1
        self.merged = False
        self.grows = True        # on_train_step follows the stage schedule; False: the stage stays
        self.supports_kv_cache = config.attention == "causal"
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        self.wpe = PositionEmbedding(config.pos, config.block_size, config.n_embd)
        alibi = config.alibi_bidirectional if config.pos == "alibi" else None
        self.blocks = nn.ModuleList(Block(config.n_embd, config.n_head, config.dropout, alibi, **block_options(config))
                                    for _ in range(config.n_layer // 4))
        self.ln_f = make_norm(config.norm, config.n_embd)
        self.head = OutputHead(config.head)                   # tied to wte; no weights of its own but beta
        # Residual projections are scaled for the 12 applications, as in a 12-layer GPT-2.
        self.apply(lambda m: init_gpt2_weights(m, config.n_layer, config.zero_init_proj))

    def features(self, idx, key_mask=None, cache=None):
        """idx (B, T) -> final hidden states (B, T, C) after ln_f; key_mask (B, T) bool, True = attendable.
        With a KV cache, idx comes after the cache's columns and key_mask marks its left padding (prompt only);
        each row's positions come from the cache (components.KVCache)."""
        x, key_mask = embed_tokens(self, idx, key_mask, cache)   # (B, T, C); key_mask None with a cache
        repeats = self.config.n_layer // len(self.blocks)      # 4, 2, 1 in stages 1, 2, 3
        for a in range(self.config.n_layer):                   # one cache slot per application
            x = self.blocks[a // repeats](x, self.config.attention, cache, slot=a, key_mask=key_mask)
        if cache is not None:
            cache.advance(idx.size(1))
        return self.ln_f(x)

    def forward(self, idx, targets=None, cache=None, key_mask=None):
        logits = self.head(self.features(idx, key_mask, cache), self.wte.weight)  # (B, T, V)
        loss = masked_cross_entropy(logits, targets) if targets is not None else None  # the plain loss, a scalar
        return logits, loss

    # ---- stages ---------------------------------------------------------------------------
    def set_stage(self, stage):
        """Grow to `stage` (1..3) one stage at a time; the function the model computes does not change."""
        if stage not in (1, 2, 3):
            raise ValueError(f"stage must be 1, 2 or 3, not {stage!r}")
        if stage < self.stage:
            raise ValueError(f"stages only go up: the model is in stage {self.stage}, asked for {stage}")
        while self.stage < stage:
            self._diverge()

    @torch.no_grad()
    def _diverge(self):
        c = self.config
        blocks, origins = nn.ModuleList(), {}
        for i in range(2 * len(self.blocks)):
            block = copy.deepcopy(self.blocks[i // 2])
            origins.update(zip(block.parameters(), self.blocks[i // 2].parameters()))  # copy -> source
            for name in ("c_attn", "c_proj"):
                layer = getattr(block.attn, name)
                if isinstance(layer, LoRALinear):
                    layer = layer.merged()          # stage 3: fold the stage-2 update into the frozen weight
                setattr(block.attn, name, LoRAProjection(layer, c.lora_rank, c.lora_alpha))  # freezes layer
            blocks.append(block)
        self.blocks = blocks
        self.parameter_origins = origins  # the trainer starts each copy's Adam state from its source's
        self.stage += 1
        self.merged = False  # the new blocks carry fresh LoRA

    def stage_at(self, step, max_steps):
        c = self.config
        return 1 + int(step >= round(c.stage2_at * max_steps)) + int(step >= round(c.stage3_at * max_steps))

    def on_train_step(self, step, max_steps):
        target = self.stage_at(step, max_steps)
        if not self.grows or target <= self.stage:
            return False
        self.set_stage(target)
        return True

    def log_fields(self):
        return {"stage": self.stage}

    def memory_probe_model(self):
        """A copy in the last stage (12 blocks, LoRA): the micro batch must fit every stage."""
        probe = copy.deepcopy(self)
        probe.set_stage(3)
        return probe

    def extra_state(self):
        return {"stage": self.stage, "merged": True} if self.merged else {"stage": self.stage}

    def load_extra_state(self, state):
        self.set_stage(int(state.get("stage", 1)))
        if state.get("merged"):
            self.prepare_for_inference()

    def prepare_for_inference(self):
        """Fold every LoRA into its weight: plain nn.Linear layers, same function, no LoRA cost."""
        merge_lora(self.blocks)
        self.merged = True

    # ---- generation -----------------------------------------------------------------------
    def forward_cached(self, idx, cache, key_mask=None):
        return self(idx, cache=cache, key_mask=key_mask)[0]

    def new_cache(self, batch_size, device, dtype, extra_columns=0):
        c = self.config
        return KVCache(c.n_layer, batch_size, c.n_head, c.block_size + extra_columns, c.n_embd // c.n_head,
                       device, dtype)
