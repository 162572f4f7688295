"""
Baseline GPT-2, as in build-nanogpt: learned token and position embeddings, n_layer pre-LN blocks
(causal self-attention + GELU MLP), a final LayerNorm and an output head tied to the token embedding.

    idx (B, T) -> wte (B, T, C) + wpe (T, C) -> n_layer x Block -> ln_f -> @ wte.T -> logits (B, T, V)

The loss: forward(idx, targets) returns the logits and the plain loss, masked_cross_entropy on all (B, T, V)
logits (for users and tests). Training does not call it: the trainer calls training_loss()
(auto_regressive_model.py), which computes the same loss and gradient with the chunked head,
chunked_cross_entropy, a few rows of logits at a time: all of them would take gigabytes with GPT-2's 50k tokens
(tests/test_loss_paths.py checks that both agree).

Options (components.py): pos = learned (GPT-2's wpe) | sinusoidal | alibi (no wpe; linear biases in every
attention layer) | none; head = tied | clap | clap-cosine (unit-length embeddings in, logits = beta * h @
normalize(wte)^T, the seed's CLAP; clap-cosine also normalises h);
rope (rotary q/k, no wpe); norm = layer | rms; mlp = gelu | relu2 | swiglu; qk_norm; zero_init_proj;
attention = causal | bidirectional (an encoder, e.g. for MNTP: it sees both sides, so it cannot generate;
with ALiBi it uses the alibi_bidirectional variant, the seed's "shifted" or "symmetric").
With pos alibi, rope, sinusoidal or none there is no position table, so T may exceed block_size at evaluation.

The rtx3080 preset is the seed's size (12 layers, 6 heads, 192 wide, context 256), which fits a 10 GB GPU
with micro batches of 8; tiny trains on a laptop CPU in a couple of minutes.
"""

from dataclasses import dataclass

import torch.nn as nn

from auto_regressive_model import (AutoRegressiveModel, ModelConfigError, check_options, check_positive,
                                   masked_cross_entropy)
from components import (Block, KVCache, OutputHead, PositionEmbedding, block_options, embed_tokens,
                        init_gpt2_weights, make_norm)


@dataclass
class Config:
    vocab_size: int = 50304   # GPT-2's 50257 rounded up to a multiple of 64 (faster matmuls)
    block_size: int = 256     # longest context (of the training data; alibi/sinusoidal/none can go further)
    n_layer: int = 12
    n_head: int = 6
    n_embd: int = 192
    dropout: float = 0.0
    pos: str = "learned"      # learned | sinusoidal | alibi | none | rope
    head: str = "tied"        # tied | clap | clap-cosine
    attention: str = "causal"  # causal | bidirectional (an encoder: no generate())
    alibi_bidirectional: str = "shifted"  # ALiBi under bidirectional attention: shifted (the seed's) | symmetric
    norm: str = "layer"       # layer | rms (nn.RMSNorm)
    mlp: str = "gelu"         # gelu | relu2 | swiglu (2/3 hidden width: about the same weights)
    qk_norm: bool = False     # RMSNorm on q and k of every head
    zero_init_proj: bool = False  # residual-branch output projections start at zero (blocks start as identity)


PRESETS = {
    "rtx3080": dict(n_layer=12, n_head=6, n_embd=192, block_size=256),
    "tiny": dict(n_layer=4, n_head=4, n_embd=128, block_size=128),
}


def check_sizes(config):
    check_positive(config, "vocab_size", "block_size", "n_layer", "n_head", "n_embd")
    if config.n_embd % config.n_head != 0:
        raise ModelConfigError(f"n_embd ({config.n_embd}) must be a multiple of n_head ({config.n_head})")
    check_options(config)


class Model(AutoRegressiveModel):
    supports_kv_cache = True   # per instance: False when bidirectional

    def __init__(self, config):
        super().__init__()
        check_sizes(config)
        self.config = config
        self.supports_kv_cache = config.attention == "causal"
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        self.wpe = PositionEmbedding(config.pos, config.block_size, config.n_embd)
        alibi = config.alibi_bidirectional if config.pos == "alibi" else None
        self.blocks = nn.ModuleList(Block(config.n_embd, config.n_head, config.dropout, alibi, **block_options(config))
                                    for _ in range(config.n_layer))
        self.ln_f = make_norm(config.norm, config.n_embd)
        self.head = OutputHead(config.head)                   # tied to wte; no weights of its own but beta
        self.apply(lambda m: init_gpt2_weights(m, config.n_layer, config.zero_init_proj))

    def features(self, idx, key_mask=None, cache=None):
        """idx (B, T) -> final hidden states (B, T, C) after ln_f; key_mask (B, T) bool, True = attendable.
        With a KV cache, idx comes after the cache's columns and key_mask marks its left padding (prompt only);
        each row's positions come from the cache (components.KVCache)."""
        x, key_mask = embed_tokens(self, idx, key_mask, cache)   # (B, T, C); key_mask None with a cache
        for i, block in enumerate(self.blocks):
            x = block(x, self.config.attention, cache, slot=i, key_mask=key_mask)
        if cache is not None:
            cache.advance(idx.size(1))
        return self.ln_f(x)

    def forward(self, idx, targets=None, cache=None, key_mask=None):
        logits = self.head(self.features(idx, key_mask, cache), self.wte.weight)  # (B, T, V)
        loss = masked_cross_entropy(logits, targets) if targets is not None else None  # the plain loss, a scalar
        return logits, loss

    def forward_cached(self, idx, cache, key_mask=None):
        return self(idx, cache=cache, key_mask=key_mask)[0]

    def new_cache(self, batch_size, device, dtype, extra_columns=0):
        c = self.config
        return KVCache(c.n_layer, batch_size, c.n_head, c.block_size + extra_columns, c.n_embd // c.n_head,
                       device, dtype)
