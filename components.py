"""
Building blocks shared by every model: attention with its masks, ALiBi biases, rotary positions and KV cache,
position embeddings, the output heads, MLP variants, norms, the pre-norm Block, LoRALinear, and GPT-2 weight
initialisation.

Shapes: B batch, T sequence length, C = n_embd channels, H heads, D = C // H head size, V vocabulary.

Masks (True = query row may attend to key column), for T = 4:
    causal        anti-causal   bidirectional
    1 0 0 0       1 1 1 1       1 1 1 1
    1 1 0 0       0 1 1 1       1 1 1 1
    1 1 1 0       0 0 1 1       1 1 1 1
    1 1 1 1       0 0 0 1       1 1 1 1
Causal is `tril`, anti-causal is `triu`. (One of the seeds used `tril(ones).flip(0)`, which is neither:
its first row sees every position, so early positions can read their own target.)

Key (padding / filler) masks: key_mask (B, T_k) bool, True = that key may be attended. It is ANDed with the
mask above, and the diagonal is always allowed, so a query whose every allowed key is masked (a filler
position under a causal mask) attends to itself instead of producing NaN.

ALiBi (Press et al. 2022, "Train Short, Test Long"): no position embedding; head h adds -m_h * distance to
the attention score, m_h the geometric slopes of alibi_slopes(). Per head, for T = 5 with m = 1 (-inf = masked):
    causal                 anti-causal (mirrored)    bidirectional symmetric   bidirectional "shifted" (the seed's)
     0 -  -  -  -           0 -1 -2 -3 -4             0 -1 -2 -3 -4             0 -.5 -1.5 -2.5 -3.5
    -1  0 -  -  -           -  0 -1 -2 -3            -1  0 -1 -2 -3            -1   0  -.5 -1.5 -2.5
    -2 -1  0 -  -           -  -  0 -1 -2            -2 -1  0 -1 -2            -2  -1    0  -.5 -1.5
    -3 -2 -1  0 -           -  -  -  0 -1            -3 -2 -1  0 -1            -3  -2   -1    0  -.5
    -4 -3 -2 -1  0          -  -  -  -  0            -4 -3 -2 -1  0            -4  -3   -2   -1    0
"Shifted" moves the biases of keys ahead of the query up by 0.5 * m, so that a head can tell "ahead" from
"behind" (as discussed in github.com/ofirpress/attention_with_linear_biases/issues/5). The bias only depends on
the distance, so it works at any length: an ALiBi model can be evaluated on contexts longer than it was trained on.

The modern switches (as in the NanoGPT speedrun, modded-nanogpt, and Llama-style models), every one
a Config field of every model, read by block_options():
    pos="rope"       rotary positions (Su et al. 2021, RoFormer): no position embedding; q and k of every head are
                     rotated by angles proportional to their position, so q_i . k_j depends on i - j only. Like
                     ALiBi it works at any length; with the KV cache the new queries rotate by their absolute
                     position; dual_mask_gpt's bw direction passes its mirrored positions (T .. 0).
    norm="rms"       nn.RMSNorm instead of nn.LayerNorm everywhere (blocks, final norm, hourglass levels)
    mlp="relu2"      ReLU(x)^2 instead of GELU (Primer, So et al. 2021); "swiglu": silu(x W_g) * (x W_u) with the
                     hidden width 2/3 of 4C (rounded to a multiple of 8), so the MLP keeps about 8 C^2 weights
    qk_norm=True     RMSNorm (with a learned gain per channel) on q and k of every head before the dot product
    zero_init_proj   the output projection of every residual branch (attention c_proj, MLP c_proj, the
                     hourglass's upsampling) starts at zero, so every block starts as the identity
"""

import functools
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

MASK_KINDS = ("causal", "anticausal", "bidirectional")
POS_KINDS = ("learned", "sinusoidal", "alibi", "none", "rope")
NORM_KINDS = ("layer", "rms")
MLP_KINDS = ("gelu", "relu2", "swiglu")
HEAD_KINDS = ("tied", "clap", "clap-cosine")
ALIBI_BIDIRECTIONAL = ("shifted", "symmetric")


def attention_mask(kind, T_q, T_k, device, q_start=0):
    """Boolean (T_q, T_k) mask, True where query may attend key; None means "attend everywhere".
    Query i sits at absolute position q_start + i, key j at position j (q_start > 0 with a KV cache)."""
    if kind == "bidirectional":
        return None
    q_pos = torch.arange(q_start, q_start + T_q, device=device)[:, None]
    k_pos = torch.arange(T_k, device=device)[None, :]
    if kind == "causal":
        return k_pos <= q_pos
    if kind == "anticausal":
        return k_pos >= q_pos
    raise ValueError(f"unknown mask kind {kind!r}; expected one of {MASK_KINDS}")


def alibi_slopes(n_head):
    """Press et al.'s head slopes: 2^(-8/n), 2^(-16/n), ... for n a power of two; otherwise the slopes of
    the nearest lower power of two, then every other slope of the next power of two."""
    def powers(n):
        return [2.0 ** (-8.0 * (i + 1) / n) for i in range(n)]
    if n_head & (n_head - 1) == 0:
        return powers(n_head)
    low = 2 ** int(math.log2(n_head))
    return powers(low) + powers(2 * low)[0::2][:n_head - low]


@functools.lru_cache(maxsize=16)
def alibi_bias(kind, T_q, T_k, n_head, q_start=0, shifted=False, device="cpu", dtype=torch.float32):
    """Additive attention bias (H, T_q, T_k): -slope * distance where `kind`'s mask allows, -inf elsewhere.
    Query i sits at position q_start + i. shifted: for bidirectional attention, keys ahead get + 0.5 * slope
    (the seed's asymmetric variant). Built once per argument tuple and cached (do not modify it in place)."""
    with torch.inference_mode(False):  # a cached tensor must stay usable outside inference mode
        q_pos = torch.arange(q_start, q_start + T_q, device=device)[:, None]
        k_pos = torch.arange(T_k, device=device)[None, :]
        distance = (q_pos - k_pos).abs().float()                                    # (T_q, T_k)
        slopes = torch.tensor(alibi_slopes(n_head), device=device)[:, None, None]  # (H, 1, 1)
        bias = -slopes * distance
        if kind == "bidirectional" and shifted:
            bias = bias + 0.5 * slopes * (k_pos > q_pos)
        allowed = attention_mask(kind, T_q, T_k, device, q_start)
        if allowed is not None:
            bias = bias.masked_fill(~allowed, float("-inf"))
        return bias.to(dtype)


def attention_bias(kind, T_q, T_k, device, q_start=0, key_mask=None, alibi=None, n_head=1,
                   dtype=torch.float32):
    """The attn_mask for F.scaled_dot_product_attention, broadcastable to (B, H, T_q, T_k):
    None (attend everywhere), a bool mask (True = attend), or with alibi ("shifted"/"symmetric") a float
    bias with -inf where masked. key_mask (B, T_k) bool removes keys; the diagonal always stays allowed."""
    if key_mask is not None:
        q_pos = torch.arange(q_start, q_start + T_q, device=device)[:, None]
        diagonal = q_pos == torch.arange(T_k, device=device)[None, :]               # (T_q, T_k)
        keep = key_mask[:, None, None, :] | diagonal                                # (B, 1, T_q, T_k)
    if alibi is not None:
        bias = alibi_bias(kind, T_q, T_k, n_head, q_start, alibi == "shifted", device, dtype)
        return bias if key_mask is None else bias.masked_fill(~keep, float("-inf"))  # (B, H, T_q, T_k)
    allowed = attention_mask(kind, T_q, T_k, device, q_start)
    if key_mask is None:
        return allowed
    return keep if allowed is None else allowed & keep                              # (B, 1, T_q, T_k)


class KVCache:
    """Keys and values of every layer application seen so far, for generating a batch of rows at once.
        k, v       (n_slots, B, H, max_len, D), one column per token fed so far (the same count for every row)
        pos        how many columns are filled
        key_mask   (B, max_len) bool, False at a column that holds left padding (never attended)
        lengths    (B,) long, real tokens per row so far: the next token of row b sits at position lengths[b]
        positions  (B, T) long, the positions of the T tokens of the current forward (set by add_tokens;
                   learned / sinusoidal position embeddings and rotary embeddings read it)
    Rows of different lengths are left-padded: row b's real tokens fill its last columns, so every row's next
    token goes into the same column and a causal mask over columns is causal over each row's positions.
    Column distances equal position distances inside a row (padding only comes first), so ALiBi, which
    biases by distance, needs nothing else. A forward with a cache: add_tokens(T, key_mask) -> positions, then
    each layer's update(slot, k, v) and attention_key_mask(), then advance(T)."""

    def __init__(self, n_slots, batch_size, n_head, max_len, head_dim, device, dtype):
        shape = (n_slots, batch_size, n_head, max_len, head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.key_mask = torch.ones(batch_size, max_len, dtype=torch.bool, device=device)
        self.lengths = torch.zeros(batch_size, dtype=torch.long, device=device)
        self.max_len = max_len
        self.pos = 0
        self.padded = False     # any left padding so far (else attention needs no key mask)
        self.positions = None
        self._new_lengths = None

    def add_tokens(self, T, key_mask=None):
        """Announce T new columns; key_mask (B, T) bool marks the real tokens among them (False = left padding,
        for the prompt only). Returns and records their positions (B, T): each row counts its own real tokens."""
        assert self.pos + T <= self.max_len, f"cache full: {self.pos} + {T} columns > {self.max_len}"
        if key_mask is None:
            offsets = torch.arange(T, device=self.lengths.device)[None, :]
            self._new_lengths = self.lengths + T
        else:
            self.key_mask[:, self.pos:self.pos + T] = key_mask
            self.padded = self.padded or not bool(key_mask.all())
            offsets = key_mask.long().cumsum(dim=1) - 1            # padding: -1 (clamped to 0 below)
            self._new_lengths = self.lengths + key_mask.long().sum(dim=1)
        self.positions = (self.lengths[:, None] + offsets).clamp(min=0)
        return self.positions

    def update(self, slot, k, v):
        """Store k, v (B, H, T, D) in columns pos..pos+T and return all keys/values up to there."""
        T = k.size(2)
        self.k[slot, :, :, self.pos:self.pos + T] = k
        self.v[slot, :, :, self.pos:self.pos + T] = v
        return self.k[slot, :, :, :self.pos + T], self.v[slot, :, :, :self.pos + T]

    def attention_key_mask(self, T):
        """(B, pos + T) bool, True = a key that may be attended, for queries in columns pos..pos+T; None
        when no row has padding (every key is real)."""
        return self.key_mask[:, :self.pos + T] if self.padded else None

    def advance(self, T):
        self.pos += T
        self.lengths = self._new_lengths

    def replace_row(self, i, other):
        """Row i restarts from the tokens held by `other`, a one-row cache: they fill row i's last
        other.pos columns (up to self.pos), everything before them becomes padding."""
        n = other.pos
        assert n <= self.pos, f"{n} columns do not fit in {self.pos}"
        self.k[:, i, :, self.pos - n:self.pos] = other.k[:, 0, :, :n]
        self.v[:, i, :, self.pos - n:self.pos] = other.v[:, 0, :, :n]
        self.key_mask[i, :self.pos - n] = False
        self.key_mask[i, self.pos - n:self.pos] = other.key_mask[0, :n]
        self.lengths[i] = other.lengths[0]
        self.padded = True

    def keep_rows(self, rows):
        """Keep only the batch rows `rows` (a list of indices), e.g. when the others have finished, and drop
        the leading columns that are padding in every kept row. Positions are unchanged."""
        rows = torch.as_tensor(rows, dtype=torch.long, device=self.key_mask.device)
        key_mask = self.key_mask[rows, :self.pos]
        first_real = key_mask.int().argmax(dim=1)           # every row holds at least one real token
        drop = int(first_real.min()) if self.pos else 0
        n = self.pos - drop
        for name in ("k", "v"):
            old = getattr(self, name)
            new = torch.zeros(old.size(0), len(rows), *old.shape[2:], device=old.device, dtype=old.dtype)
            new[:, :, :, :n] = old[:, rows, :, drop:self.pos]
            setattr(self, name, new)
        self.key_mask = torch.ones(len(rows), self.max_len, dtype=torch.bool, device=rows.device)
        self.key_mask[:, :n] = key_mask[:, drop:]
        self.padded = not bool(self.key_mask[:, :n].all())
        self.lengths = self.lengths[rows]
        self.pos = n


def apply_rotary(x, pos, base=10000.0):
    """Rotate x (B, H, T, D) by its positions pos, (T,) or (B, T) long: channel pair (i, i + D/2) turns by
    pos * base^(-2i/D), so that rotated q_i . k_j depends on q, k and i - j only (RoPE, half-split layout)."""
    half = x.size(-1) // 2
    freq = base ** (-torch.arange(half, device=x.device, dtype=torch.float32) / half)    # (D/2,)
    angle = pos.to(torch.float32)[..., None] * freq                                       # (T | B,T, D/2)
    if angle.dim() == 3:
        angle = angle[:, None]                                                            # (B, 1, T, D/2)
    cos, sin = angle.cos(), angle.sin()
    x1, x2 = x.float().split(half, dim=-1)
    return torch.cat([x1 * cos + x2 * sin, x2 * cos - x1 * sin], dim=-1).to(x.dtype)


def make_norm(kind, dim):
    """The normalisation layer of Config.norm: nn.LayerNorm (GPT-2) or nn.RMSNorm (no mean, no bias)."""
    assert kind in NORM_KINDS, f"norm must be one of {NORM_KINDS}, not {kind!r}"
    return nn.LayerNorm(dim) if kind == "layer" else nn.RMSNorm(dim, eps=1e-6)


def block_options(config):
    """The keyword arguments of Block for a model Config (its modern switches; defaults = GPT-2's recipe)."""
    return dict(rope=config.pos == "rope", norm=config.norm, mlp=config.mlp, qk_norm=config.qk_norm)


class SelfAttention(nn.Module):
    """Multi-head self-attention through F.scaled_dot_product_attention (flash / memory-efficient kernels).
    alibi: None (positions come from elsewhere) or the ALiBi variant for bidirectional masks, "shifted"
    or "symmetric" (causal and anti-causal masks have one ALiBi each; the variant only matters there).
    rope: rotate q and k by their positions (apply_rotary); qk_norm: RMSNorm on q and k of each head first."""

    def __init__(self, n_embd, n_head, dropout=0.0, alibi=None, rope=False, qk_norm=False):
        super().__init__()
        assert n_embd % n_head == 0, f"n_embd {n_embd} must be divisible by n_head {n_head}"
        assert alibi in (None, *ALIBI_BIDIRECTIONAL), f"alibi must be None or one of {ALIBI_BIDIRECTIONAL}"
        assert not (rope and (n_embd // n_head) % 2), f"rope needs an even head size, not {n_embd // n_head}"
        self.n_head = n_head
        self.alibi = alibi
        self.rope = rope
        self.c_attn = nn.Linear(n_embd, 3 * n_embd)  # q, k, v for all heads in one matmul
        self.c_proj = nn.Linear(n_embd, n_embd)
        self.c_proj.RESIDUAL_SCALE_INIT = True
        if qk_norm:
            self.q_norm = nn.RMSNorm(n_embd // n_head, eps=1e-6)
            self.k_norm = nn.RMSNorm(n_embd // n_head, eps=1e-6)
        self.qk_norm = qk_norm
        self.dropout = dropout

    def forward(self, x, mask="causal", cache=None, slot=0, key_mask=None, pos=None):
        """x (B, T, C) -> (B, T, C). mask: a MASK_KINDS name; cache: a KVCache whose `slot` this layer uses
        (queries then sit in columns cache.pos.., at positions cache.positions; its key mask hides left
        padding); key_mask (B, T) bool, True = key may be attended (without a cache). pos (T,) long: the rotary
        positions of x's rows when they are not 0, 1, ... (dual_mask_gpt's bw direction counts them backwards)."""
        B, T, C = x.size()
        q, k, v = self.c_attn(x).split(C, dim=2)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))  # (B, H, T, D)
        q_start = 0
        if cache is not None:  # queries sit in columns cache.pos..; left padding comes as a key mask
            assert key_mask is None, "with a cache, the key mask comes from the cache"
            key_mask = cache.attention_key_mask(T)
            q_start = cache.pos
        if self.qk_norm:  # in fp32 (under autocast q, k are bf16, the gains fp32)
            q, k = self.q_norm(q.float()).to(v.dtype), self.k_norm(k.float()).to(v.dtype)
        if self.rope:  # before the cache: cached keys keep the rotation of their own position
            if pos is None:  # with a cache: each row's own positions (B, T), left padding not counted
                pos = cache.positions if cache is not None else torch.arange(T, device=x.device)
            q, k = apply_rotary(q, pos), apply_rotary(k, pos)
        if cache is not None:
            k, v = cache.update(slot, k, v)
        dropout_p = self.dropout if self.training else 0.0
        if mask == "causal" and key_mask is None and self.alibi is None and (q_start == 0 or T == 1):
            # Fast paths: is_causal without a cache; one new token after the cache sees every key, no mask.
            y = F.scaled_dot_product_attention(q, k, v, is_causal=q_start == 0 and T > 1, dropout_p=dropout_p)
        else:
            attn_mask = attention_bias(mask, T, k.size(2), x.device, q_start, key_mask, self.alibi,
                                       self.n_head, q.dtype)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # re-assemble heads side by side
        return self.c_proj(y)


def sinusoidal_table(pos, n_embd):
    """Vaswani et al.'s fixed position vectors for positions pos (T,) or (B, T) -> (..., C): sin and cos of
    pos / 10000^(2i/C), sin in the first half of the channels, cos in the second."""
    half = n_embd // 2
    freq = torch.exp(-math.log(10000.0) * torch.arange(half, device=pos.device, dtype=torch.float32) / half)
    angle = pos.float()[..., None] * freq                                         # (..., C/2)
    table = torch.cat([angle.sin(), angle.cos()], dim=-1)
    return F.pad(table, (0, n_embd - 2 * half))                                   # odd C: one zero channel


class PositionEmbedding(nn.Module):
    """What is added to the token embeddings for positions pos (T,) or (B, T) long: (..., C), or 0.0.
        learned     a trained (n_positions, C) table, GPT-2's wpe (n_positions = the longest context)
        sinusoidal  sinusoidal_table(pos), computed on the fly: any length
        alibi/none  nothing: ALiBi puts positions into the attention biases; "none" relies on the causal
        rope        mask alone (NoPE); rope rotates q and k inside attention (apply_rotary)
    With "learned" the weight is `weight`, as nn.Embedding's, so checkpoints keep the key `wpe.weight`."""

    def __init__(self, kind, n_positions, n_embd):
        super().__init__()
        assert kind in POS_KINDS, f"pos must be one of {POS_KINDS}, not {kind!r}"
        self.kind, self.n_positions, self.n_embd = kind, n_positions, n_embd
        if kind == "learned":
            self.weight = nn.Parameter(torch.empty(n_positions, n_embd))
            nn.init.normal_(self.weight, mean=0.0, std=0.02)

    @property
    def max_positions(self):
        """How many positions (0 .. max_positions - 1) this embedding can serve."""
        return self.n_positions if self.kind == "learned" else math.inf

    def forward(self, pos):
        if self.kind == "learned":
            return F.embedding(pos, self.weight)
        if self.kind == "sinusoidal":
            return sinusoidal_table(pos, self.n_embd)
        return 0.0


def embed_tokens(model, idx, key_mask=None, cache=None):
    """The start of a GPT-2-style features(): token plus position embeddings of idx (B, T) -> (x (B, T, C), the
    key mask for the blocks), with the model's wte, wpe (a PositionEmbedding) and head. Without a cache the
    positions are 0 .. T-1; with a KV cache, idx comes after the cache's columns, each row's positions are
    counted by the cache (left padding not counted) and key_mask (the prompt's padding) goes into the cache, so
    the blocks get None."""
    B, T = idx.size()
    if cache is not None:
        pos = cache.add_tokens(T, key_mask)                        # (B, T): per-row positions
        key_mask = None                                            # the attention reads it from the cache
    else:
        pos = torch.arange(T, device=idx.device)
    last = int(pos.max()) if cache is not None else T - 1
    assert last < model.wpe.max_positions, f"length {last + 1} > block_size {model.config.block_size}"
    return model.head.embed(model.wte, idx) + model.wpe(pos), key_mask


class OutputHead(nn.Module):
    """The token embedding's partner: how tokens enter the network and how logits come out, weights tied.
        tied         x = E[idx];               logits = h @ E^T                                       (GPT-2)
        clap         x = normalize(E[idx]);    logits = beta * h @ normalize(E)^T,            beta = 1 at first
        clap-cosine  x = normalize(E[idx]);    logits = beta * normalize(h) @ normalize(E)^T, beta = 1/0.07 at first
    CLAP (seed 002, "ALiBi and CLAP head"; its code is fairseq's ClapHead): no extra layer and no output bias;
    the embeddings are L2-normalised on the way in and in the output product, the final hidden states are not;
    beta, a learned scalar (the "thermodynamic beta"), starts at 1. clap-cosine is our earlier variant: h is
    normalised too, so logits are beta times cosines (|logits| <= beta) and beta = exp(log_beta) starts at
    CLIP's logit scale 1/0.07."""

    def __init__(self, kind="tied"):
        super().__init__()
        assert kind in HEAD_KINDS, f"head must be one of {HEAD_KINDS}, not {kind!r}"
        self.kind = kind
        if kind == "clap":
            self.beta = nn.Parameter(torch.tensor(1.0))
        elif kind == "clap-cosine":
            self.log_beta = nn.Parameter(torch.tensor(math.log(1 / 0.07)))  # log: stays positive

    def embed(self, wte, idx):
        """idx (B, T) -> token embeddings (B, T, C) through the nn.Embedding wte."""
        x = wte(idx)
        return x if self.kind == "tied" else F.normalize(x, dim=-1)

    def forward(self, h, weight):
        """h (B, T, C) final hidden states, weight (V, C) the token embedding -> logits (B, T, V)."""
        a, b = self.operands(h, weight)
        return a @ b.t()

    def operands(self, h, weight):
        """(a, b) with logits = a @ b^T: what a chunked loss needs to compute the logits a few rows at a time."""
        if self.kind == "tied":
            return h, weight
        if self.kind == "clap":
            return self.beta * h, F.normalize(weight, dim=-1)
        return self.log_beta.exp() * F.normalize(h, dim=-1), F.normalize(weight, dim=-1)


class MLP(nn.Module):
    """kind gelu (GPT-2: c_proj(gelu(c_fc x)), hidden 4C), relu2 (relu(.)^2 instead of gelu) or swiglu
    (c_fc makes gate and up side by side: c_proj(silu(gate) * up), hidden 2/3 of 4C: about the same weights)."""

    def __init__(self, n_embd, hidden_mult=4, kind="gelu"):
        super().__init__()
        assert kind in MLP_KINDS, f"mlp must be one of {MLP_KINDS}, not {kind!r}"
        self.kind = kind
        hidden = hidden_mult * n_embd
        if kind == "swiglu":
            hidden = 8 * max(1, round(2 * hidden / 3 / 8))
        self.c_fc = nn.Linear(n_embd, 2 * hidden if kind == "swiglu" else hidden)
        if kind == "gelu":
            self.gelu = nn.GELU(approximate="tanh")  # GPT-2's GELU
        self.c_proj = nn.Linear(hidden, n_embd)
        self.c_proj.RESIDUAL_SCALE_INIT = True

    def forward(self, x):
        h = self.c_fc(x)
        if self.kind == "gelu":
            h = self.gelu(h)
        elif self.kind == "relu2":
            h = F.relu(h).square()
        else:
            gate, up = h.chunk(2, dim=-1)
            h = F.silu(gate) * up
        return self.c_proj(h)


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(norm(x)), then x + mlp(norm(x)). The keyword options are the
    modern switches (block_options); their defaults are GPT-2's (LayerNorm, GELU, no rotary, no QK-norm)."""

    def __init__(self, n_embd, n_head, dropout=0.0, alibi=None, rope=False, norm="layer", mlp="gelu",
                 qk_norm=False):
        super().__init__()
        self.ln_1 = make_norm(norm, n_embd)
        self.attn = SelfAttention(n_embd, n_head, dropout, alibi, rope, qk_norm)
        self.ln_2 = make_norm(norm, n_embd)
        self.mlp = MLP(n_embd, kind=mlp)

    def forward(self, x, mask="causal", cache=None, slot=0, key_mask=None, pos=None):
        x = x + self.attn(self.ln_1(x), mask, cache, slot, key_mask, pos)
        x = x + self.mlp(self.ln_2(x))
        return x


class LoRALinear(nn.Module):
    """y = W x + b + (alpha / r) * B A x, with W, b frozen; A (r, in) random, B (out, r) zero,
    so a fresh LoRALinear computes exactly what the wrapped nn.Linear did. `merged()` folds the update
    into a plain nn.Linear, so inference costs nothing extra."""

    def __init__(self, base: nn.Linear, r=8, alpha=16):
        super().__init__()
        self.base = base
        for p in self.base.parameters():
            p.requires_grad_(False)
        self.r, self.alpha, self.scale = r, alpha, alpha / r
        self.lora_A = nn.Parameter(torch.empty(r, base.in_features, device=base.weight.device))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, r, device=base.weight.device))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # as nn.Linear initialises its weight

    def forward(self, x):
        return self.base(x) + F.linear(F.linear(x, self.lora_A), self.lora_B) * self.scale

    @torch.no_grad()
    def merged(self):
        out = nn.Linear(self.base.in_features, self.base.out_features, bias=self.base.bias is not None,
                        device=self.base.weight.device, dtype=self.base.weight.dtype)
        out.weight.copy_(self.base.weight + self.scale * (self.lora_B @ self.lora_A))
        if self.base.bias is not None:
            out.bias.copy_(self.base.bias)
        for attr in ("RESIDUAL_SCALE_INIT",):
            if hasattr(self.base, attr):
                setattr(out, attr, getattr(self.base, attr))
        return out


def merge_lora(module):
    """Replace every LoRALinear below `module` by its merged nn.Linear (in place); returns the count."""
    count = 0
    for name, child in list(module.named_children()):
        if isinstance(child, LoRALinear):
            setattr(module, name, child.merged())
            count += 1
        else:
            count += merge_lora(child)
    return count


def init_gpt2_weights(module, n_layer, zero_init_proj=False):
    """GPT-2 init: N(0, 0.02) weights, zero biases; residual projections scaled by 1/sqrt(2 * n_layer)
    so the residual stream's variance does not grow with depth, or zero with zero_init_proj (the speedrun's)."""
    if isinstance(module, nn.Linear):
        std = 0.02
        if getattr(module, "RESIDUAL_SCALE_INIT", False):
            std = 0.0 if zero_init_proj else std * (2 * n_layer) ** -0.5
        nn.init.normal_(module.weight, mean=0.0, std=std)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, (nn.Embedding, PositionEmbedding)) and hasattr(module, "weight"):
        nn.init.normal_(module.weight, mean=0.0, std=0.02)
