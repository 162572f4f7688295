"""
Building blocks shared by every model: attention with its masks and KV cache, MLP, the pre-LN Block,
LoRALinear, and GPT-2 weight initialisation.

Shapes: B batch, T sequence length, C = n_embd channels, H heads, D = C // H head size.

Masks (True = query row may attend to key column), for T = 4:
    causal        anti-causal   bidirectional
    1 0 0 0       1 1 1 1       1 1 1 1
    1 1 0 0       0 1 1 1       1 1 1 1
    1 1 1 0       0 0 1 1       1 1 1 1
    1 1 1 1       0 0 0 1       1 1 1 1
Causal is `tril`, anti-causal is `triu`. (One of the seeds used `tril(ones).flip(0)`, which is neither:
its first row sees every position, so early positions can read their own target.)
"""

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

MASK_KINDS = ("causal", "anticausal", "bidirectional")


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


class KVCache:
    """Keys and values of every layer application seen so far, for generation one token at a time.
    k, v: (n_slots, B, H, max_len, D); `pos` is how many positions are filled."""

    def __init__(self, n_slots, batch_size, n_head, max_len, head_dim, device, dtype):
        shape = (n_slots, batch_size, n_head, max_len, head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.max_len = max_len
        self.pos = 0

    def update(self, slot, k, v):
        """Store k, v (B, H, T, D) at positions pos..pos+T and return all keys/values up to there."""
        T = k.size(2)
        self.k[slot, :, :, self.pos:self.pos + T] = k
        self.v[slot, :, :, self.pos:self.pos + T] = v
        return self.k[slot, :, :, :self.pos + T], self.v[slot, :, :, :self.pos + T]

    def advance(self, T):
        self.pos += T


class SelfAttention(nn.Module):
    """Multi-head self-attention through F.scaled_dot_product_attention (flash / memory-efficient kernels)."""

    def __init__(self, n_embd, n_head, dropout=0.0):
        super().__init__()
        assert n_embd % n_head == 0, f"n_embd {n_embd} must be divisible by n_head {n_head}"
        self.n_head = n_head
        self.c_attn = nn.Linear(n_embd, 3 * n_embd)  # q, k, v for all heads in one matmul
        self.c_proj = nn.Linear(n_embd, n_embd)
        self.c_proj.RESIDUAL_SCALE_INIT = True
        self.dropout = dropout

    def forward(self, x, mask="causal", cache=None, slot=0):
        B, T, C = x.size()
        q, k, v = self.c_attn(x).split(C, dim=2)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))  # (B, H, T, D)
        q_start = 0
        if cache is not None:
            q_start = cache.pos
            k, v = cache.update(slot, k, v)
        dropout_p = self.dropout if self.training else 0.0
        if mask == "causal" and q_start == 0:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=dropout_p)
        else:
            attn_mask = attention_mask(mask, T, k.size(2), x.device, q_start)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # re-assemble heads side by side
        return self.c_proj(y)


class MLP(nn.Module):
    def __init__(self, n_embd, hidden_mult=4):
        super().__init__()
        self.c_fc = nn.Linear(n_embd, hidden_mult * n_embd)
        self.gelu = nn.GELU(approximate="tanh")  # GPT-2's GELU
        self.c_proj = nn.Linear(hidden_mult * n_embd, n_embd)
        self.c_proj.RESIDUAL_SCALE_INIT = True

    def forward(self, x):
        return self.c_proj(self.gelu(self.c_fc(x)))


class Block(nn.Module):
    """Pre-LN transformer block: x + attn(ln(x)), then x + mlp(ln(x))."""

    def __init__(self, n_embd, n_head, dropout=0.0):
        super().__init__()
        self.ln_1 = nn.LayerNorm(n_embd)
        self.attn = SelfAttention(n_embd, n_head, dropout)
        self.ln_2 = nn.LayerNorm(n_embd)
        self.mlp = MLP(n_embd)

    def forward(self, x, mask="causal", cache=None, slot=0):
        x = x + self.attn(self.ln_1(x), mask, cache, slot)
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


def init_gpt2_weights(module, n_layer):
    """GPT-2 init: N(0, 0.02) weights, zero biases; residual projections scaled by 1/sqrt(2 * n_layer)
    so the residual stream's variance does not grow with depth."""
    if isinstance(module, nn.Linear):
        std = 0.02
        if getattr(module, "RESIDUAL_SCALE_INIT", False):
            std *= (2 * n_layer) ** -0.5
        nn.init.normal_(module.weight, mean=0.0, std=std)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.Embedding):
        nn.init.normal_(module.weight, mean=0.0, std=0.02)
