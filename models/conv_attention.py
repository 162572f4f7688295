"""
Convolution-attention model: the seed's compressor/expander idea, wired causally as an hourglass
transformer (Nawrot et al. 2021, "Hierarchical Transformers Are More Efficient Language Models").

Shape (rtx3080 preset: C = n_embd = 48, T = 1024, factor 4, 3 levels; the seed's layer list):

    idx (B, T) -> wte + wpe -> right-pad with zeros to Tp, a multiple of 4**3 = 64
    (B, Tp,    C)  1 block   -- skip_0 ----------------------------------------+
    shorten: (B, Tp/4,  2C)  2 blocks -- skip_1 ----------------------------+  |
    shorten: (B, Tp/16, 4C)  2 blocks -- skip_2 -------------------------+  |  |
    shorten: (B, Tp/64, 8C)  2 blocks (the middle)                       |  |  |
    upsample + skip_2: (B, Tp/16, 4C)  2 blocks  <-----------------------+  |  |
    upsample + skip_1: (B, Tp/4,  2C)  2 blocks  <--------------------------+  |
    upsample + skip_0: (B, Tp,     C)  1 block   <-----------------------------+
    -> drop the padding -> ln_f -> @ wte.T -> logits (B, T, V)

The loss: forward(idx, targets) returns the logits and the plain loss, masked_cross_entropy on all (B, T, V)
logits (for users and tests). Training does not call it: the trainer calls training_loss()
(auto_regressive_model.py), which computes the same loss and gradient with the chunked head,
chunked_cross_entropy, a few rows of logits at a time: all of them would take gigabytes with GPT-2's 50k tokens
(tests/test_loss_paths.py checks that both agree).

12 blocks in all (the seed's 1 + 2 + 2 + 2 + 2 + 2 + 1; its code built 3 x (block, compressor, block) and
3 x (block, expander, block), which puts the same counts at each resolution). Every block is pre-LN causal
self-attention + MLP (components.Block); the head count is the same at every level, so the head size
doubles with the width.

shorten  = LayerNorm, shift right by factor-1, then a strided convolution (kernel = stride = factor, width
           x2) written as "group factor neighbours side by side, one Linear" (the same operation).
upsample = LayerNorm, a transposed convolution (kernel = stride = factor, width /2) written as
           "one Linear to factor vectors", added to the skip saved at that resolution (U-Net residual).

Why it is leak-free (the seed's was not: its expander was a Conv1d whose channels were the sequence
positions, so every output position mixed every input position, future ones included).
After the shift by factor-1, group g holds positions 4g-3 .. 4g, so compressed token g summarises tokens
<= 4g. Causal attention at the short level lets token g see groups <= g, still tokens <= 4g. Upsampling
sends token g to positions 4g .. 4g+3, all >= 4g. So position i only receives groups ending at or before i;
the same argument holds level by level. Right padding is harmless for the same reason: nothing flows left.
Without the shift, group g would hold 4g .. 4g+3 and position 4g would read 4g+1 .. 4g+3 (the tests show
both the seed's expander and an unshifted hourglass leak).

Options (components.py): pos = learned | sinusoidal (added at full resolution) | alibi (the causal ALiBi bias
in every block, distances counted in that level's tokens; no wpe) | none | rope (rotary q/k in every block, positions
counted in that level's tokens as ALiBi's distances; no wpe); head = tied | clap | clap-cosine; norm = layer | rms (also the
levels' norms); mlp = gelu | relu2 | swiglu; qk_norm; zero_init_proj (also the upsampling projections, which add
into the skip's residual stream).
No key_mask (filler tokens): a compressor mixes each group of neighbours into one token, so a filler token
would reach its neighbours whatever the attention masks say. forward/features raise ValueError if given one.
No bidirectional attention: the hourglass is built for causal language modelling.

target_offset: 1 (default) trains the usual next-token objective; 64 is the seed's "predict the token 64
ahead" objective (the trainer's loader builds y that many tokens ahead). Such a model is not a next-token
model, so generate() refuses it.
"""

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from auto_regressive_model import (AutoRegressiveModel, ModelConfigError, check_options, check_positive,
                                   masked_cross_entropy)
from components import Block, OutputHead, PositionEmbedding, block_options, init_gpt2_weights, make_norm


@dataclass
class Config:
    vocab_size: int = 50304     # GPT-2's 50257 rounded up to a multiple of 64
    block_size: int = 1024      # longest context; any T <= block_size works
    n_head: int = 6             # at every level; must divide n_embd (then it divides every width)
    n_embd: int = 48            # width at full resolution; level l has n_embd * 2**l
    n_levels: int = 3           # compressor levels (and as many expander levels)
    shorten_factor: int = 4     # tokens merged into one by each compressor
    n_full_blocks: int = 1      # blocks at full resolution before the first compressor (and after the last expander)
    n_level_blocks: int = 2     # blocks at each shortened resolution, on the way down and on the way up
    dropout: float = 0.0
    target_offset: int = 1      # the target of position i is token i + target_offset (1 = next token)
    pos: str = "learned"        # learned | sinusoidal | alibi | none | rope
    head: str = "tied"          # tied | clap | clap-cosine
    norm: str = "layer"       # layer | rms (nn.RMSNorm)
    mlp: str = "gelu"         # gelu | relu2 | swiglu (2/3 hidden width: about the same weights)
    qk_norm: bool = False     # RMSNorm on q and k of every head
    zero_init_proj: bool = False  # residual-branch output projections start at zero (blocks start as identity)


PRESETS = {
    "rtx3080": dict(n_embd=48, n_head=6, block_size=1024),
    "tiny": dict(n_embd=32, n_head=4, block_size=256),
}

# Trainer defaults that differ for this model: the seed trains at context 1024, micro batch 8.
TRAIN_PRESETS = {
    "rtx3080": dict(micro_batch_size=8, seq_len=1024),
    "tiny": dict(micro_batch_size=4, seq_len=256),  # 1024 tokens per step, as the other tiny presets
}


def check_sizes(config):
    c = config
    check_positive(c, "vocab_size", "block_size", "n_head", "n_embd", "n_levels", "target_offset")
    if c.shorten_factor < 2:
        raise ModelConfigError(f"shorten_factor ({c.shorten_factor}) must be >= 2")
    if c.n_full_blocks < 0 or c.n_level_blocks < 0:
        raise ModelConfigError("n_full_blocks and n_level_blocks must be >= 0")
    # The input is padded to a multiple of shorten_factor**n_levels positions and level l is n_embd * 2**l wide:
    # levels past the one that shortens the whole context to a token only pad and widen (10 levels of 4 pad to a
    # million positions, 32768 wide: gigabytes). So the padding stays within shorten_factor x the context.
    most = max_levels(c.block_size, c.shorten_factor)
    if c.n_levels > most:
        raise ModelConfigError(f"n_levels ({c.n_levels}) pads the input to shorten_factor**n_levels positions, more "
                               f"than shorten_factor ({c.shorten_factor}) x block_size (the trainer's --seq-len, "
                               f"{c.block_size}); at most {most} level(s) fit: lower --n-levels or raise --seq-len")
    for level in range(c.n_levels + 1):
        width = c.n_embd * 2 ** level
        if width % c.n_head != 0:
            raise ModelConfigError(f"n_head ({c.n_head}) must divide the width {width} of level {level} "
                                   f"(n_embd {c.n_embd} * 2**{level})")
    check_options(c)


def max_levels(block_size, factor):
    """The most levels a context of block_size tokens can use: the largest L with factor**(L-1) <= block_size
    (at least 1), so that the padded length factor**L is at most factor x block_size."""
    most, reach = 1, factor  # reach = factor**most
    while reach <= block_size:
        most, reach = most + 1, reach * factor
    return most


class Shorten(nn.Module):
    """(B, T, C) -> (B, T/factor, 2C); T a multiple of factor. Output token g summarises inputs <= factor*g."""

    def __init__(self, n_embd, factor, norm="layer"):
        super().__init__()
        self.factor = factor
        self.shift = factor - 1  # the causal shift; the tests set it to 0 to show that it is needed
        self.ln = make_norm(norm, n_embd)
        self.proj = nn.Linear(factor * n_embd, 2 * n_embd)  # == Conv1d(C, 2C, kernel=factor, stride=factor)

    def forward(self, x):
        B, T, C = x.size()
        x = self.ln(x)
        x = F.pad(x, (0, 0, self.shift, 0))[:, :T]          # position i now holds x[i - shift] (zeros first)
        return self.proj(x.reshape(B, T // self.factor, self.factor * C))


class Upsample(nn.Module):
    """(B, T', 2C) -> (B, T' * factor, C): token g becomes positions factor*g .. factor*g + factor-1."""

    def __init__(self, n_embd, factor, norm="layer"):
        super().__init__()
        self.factor = factor
        self.ln = make_norm(norm, 2 * n_embd)
        self.proj = nn.Linear(2 * n_embd, factor * n_embd)  # == ConvTranspose1d(2C, C, kernel=stride=factor)
        self.proj.RESIDUAL_SCALE_INIT = True                # it adds into a residual stream

    def forward(self, x):
        B, T, C2 = x.size()
        return self.proj(self.ln(x)).view(B, T * self.factor, C2 // 2)


class Model(AutoRegressiveModel):
    supports_kv_cache = False  # generate() recomputes the window each step

    def __init__(self, config):
        super().__init__()
        check_sizes(config)
        self.config = c = config
        L, f = c.n_levels, c.shorten_factor
        width = [c.n_embd * 2 ** level for level in range(L + 1)]
        down_counts = [c.n_full_blocks] + [c.n_level_blocks] * (L - 1)

        alibi = "symmetric" if c.pos == "alibi" else None  # (the variant matters for bidirectional only)

        def blocks(n, w):
            return nn.ModuleList(Block(w, c.n_head, c.dropout, alibi, **block_options(c)) for _ in range(n))

        self.wte = nn.Embedding(c.vocab_size, c.n_embd)
        self.wpe = PositionEmbedding(c.pos, c.block_size, c.n_embd)
        self.down_blocks = nn.ModuleList(blocks(down_counts[l], width[l]) for l in range(L))
        self.shorten = nn.ModuleList(Shorten(width[l], f, c.norm) for l in range(L))
        self.middle_blocks = blocks(c.n_level_blocks, width[L])
        self.upsample = nn.ModuleList(Upsample(width[l], f, c.norm) for l in range(L))
        self.up_blocks = nn.ModuleList(blocks(down_counts[l], width[l]) for l in range(L))
        self.ln_f = make_norm(c.norm, c.n_embd)
        self.head = OutputHead(c.head)                    # tied to wte; no weights of its own but beta
        self.n_blocks = 2 * sum(down_counts) + c.n_level_blocks
        self.apply(lambda m: init_gpt2_weights(m, self.n_blocks, c.zero_init_proj))

    @property
    def pad_multiple(self):
        return self.config.shorten_factor ** self.config.n_levels

    def features(self, idx, key_mask=None):
        """idx (B, T) -> final hidden states (B, T, C) after ln_f. key_mask: not supported (ValueError)."""
        if key_mask is not None:
            raise ValueError("conv_attention does not support filler/key masks")
        B, T = idx.size()
        assert T <= self.wpe.max_positions, f"length {T} > block_size {self.config.block_size}"
        x = self.head.embed(self.wte, idx) + self.wpe(torch.arange(T, device=idx.device))  # (B, T, C)
        Tp = math.ceil(T / self.pad_multiple) * self.pad_multiple
        x = F.pad(x, (0, 0, 0, Tp - T))                                     # (B, Tp, C), zeros on the right
        skips = []
        for level, (blocks, shorten) in enumerate(zip(self.down_blocks, self.shorten)):
            for block in blocks:
                x = block(x, "causal")
            skips.append(x)
            x = shorten(x)                                                  # (B, Tp / f**(level+1), C * 2**(level+1))
        for block in self.middle_blocks:
            x = block(x, "causal")
        for level in reversed(range(self.config.n_levels)):
            x = skips.pop() + self.upsample[level](x)                       # back to (B, Tp / f**level, C * 2**level)
            for block in self.up_blocks[level]:
                x = block(x, "causal")
        return self.ln_f(x[:, :T])

    def forward(self, idx, targets=None, key_mask=None):
        logits = self.head(self.features(idx, key_mask), self.wte.weight)  # (B, T, V)
        loss = masked_cross_entropy(logits, targets) if targets is not None else None  # the plain loss, a scalar
        return logits, loss

    @torch.no_grad()
    def generate(self, idx, max_new_tokens, *args, **kwargs):
        if self.config.target_offset != 1:
            raise ModelConfigError(f"this model predicts the token {self.config.target_offset} ahead "
                                   f"(target_offset={self.config.target_offset}); only a target_offset=1 "
                                   f"model can generate text")
        return super().generate(idx, max_new_tokens, *args, **kwargs)
