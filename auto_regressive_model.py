"""
AutoRegressiveModel: what every model in models/ is, and what the trainer and generate.py rely on.

The forward contract
    logits, loss = model(idx, targets=None, key_mask=None)
    idx (B, T) long with T <= block_size (longer works where the positions allow it: pos alibi, sinusoidal,
    none); logits (B, T, V) for every position; loss the plain masked_cross_entropy(logits, targets), or None.
    In the forward direction the logits at position i depend only on idx[:, :i+1] (tests prove it).
    key_mask (B, T) bool, aligned with idx: False marks filler / padding tokens that no other position may
    attend to (each position still attends to itself). A model that cannot honour it raises ValueError.
    hidden = model.features(idx, key_mask=None): the final hidden states (B, T, C) after the final
    LayerNorm, before the head, one row per idx position (for embeddings; forward is head(features)).

The loss: two paths, one value (the section "the loss" below, top to bottom)
    plain     masked_cross_entropy(logits, targets, loss_mask) on the full (B, T, V) logits: what
              model(idx, targets) returns, for users and tests, and the reference.
    chunked   chunked_cross_entropy(h, w, targets, loss_mask): the same value and gradient from the head's
              operands (logits = h @ w^T), one chunk of rows at a time, the gradients computed inside forward.
    training  the trainer (base_trainer.TrainingStep) calls model.training_loss() -> lm_loss() (the class below),
              never forward's loss: lm_loss runs features() and hands the head's operands to chunked_cross_entropy.
              Evaluation: evaluation_losses() -> lm_token_losses() -> chunked_token_losses (no gradient).
    tests/test_loss_paths.py: for every model, training_loss() and the plain loss agree in value and gradient.

Hooks the trainer calls (a model overrides what it needs; the defaults are plain next-token training)
    training_loss(x, y, loss_mask, step) -> (loss, {metric: float})   one micro-batch of training; a "loss"
                                             metric replaces the logged loss (dual_mask_gpt: the fw loss)
    evaluation_losses(x, y, loss_mask)    -> {"loss": tensor, ...}    one batch of evaluation
    on_train_step(step, max_steps)        -> True when the trainable parameters changed (optimizer rebuilt;
                                             a `parameter_origins` dict {copy: source} lets copies inherit
                                             their source's Adam state)
    log_fields()                          -> {field: value} added to every metrics row (e.g. the stage)
    extra_state() / load_extra_state(d)   what a checkpoint must hold besides the weights (e.g. the stage)
    prepare_for_inference()               e.g. merge LoRA weights before generation
    memory_probe_model()                  the model as its most memory-hungry training step sees it
"""

import dataclasses

import torch
import torch.nn as nn
import torch.nn.functional as F

import components


# ---- model options: what every model's Config is checked against ----------------------------------

class ModelConfigError(ValueError):
    """An unknown model, preset or option; the message lists the valid ones."""


CHOICES = {
    "pos": components.POS_KINDS,
    "head": components.HEAD_KINDS,
    "attention": ("causal", "bidirectional"),
    "alibi_bidirectional": components.ALIBI_BIDIRECTIONAL,
    "norm": components.NORM_KINDS,
    "mlp": components.MLP_KINDS,
}
SWITCHES = ("qk_norm", "zero_init_proj")  # booleans


def check_positive(config, *names):
    """ModelConfigError naming the first of the sizes `names` that is below 1 (before any size is divided by
    another: n_head 0 must be this message, not a ZeroDivisionError)."""
    for name in names:
        value = getattr(config, name)
        if value < 1:
            raise ModelConfigError(f"{name} must be >= 1, got {value}")


def check_options(config):
    """ModelConfigError unless each of the CHOICES options that `config` has holds one of its values."""
    for name, choices in CHOICES.items():
        value = getattr(config, name, choices[0])
        if value not in choices:
            raise ModelConfigError(f"{name} {value!r} unknown; choose one of: {', '.join(choices)}")
    for name in SWITCHES:
        if not isinstance(getattr(config, name, False), bool):
            raise ModelConfigError(f"{name} must be true or false, not {getattr(config, name)!r}")
    if getattr(config, "pos", None) == "rope" and (config.n_embd // config.n_head) % 2:
        raise ModelConfigError(f"pos rope rotates pairs of channels: the head size n_embd / n_head = "
                               f"{config.n_embd // config.n_head} must be even")


# ---- prompts of different lengths (generate, evaluate) --------------------------------------------

def left_pad(prompts, device="cpu", pad=0):
    """Token lists of different lengths -> (B, T) long, each row's tokens at its end, and the key mask
    (B, T) bool that is False at the padding (T = the longest list)."""
    T = max(len(p) for p in prompts)
    idx = torch.full((len(prompts), T), pad, dtype=torch.long)
    key_mask = torch.zeros(len(prompts), T, dtype=torch.bool)
    for b, p in enumerate(prompts):
        if p:
            idx[b, T - len(p):] = torch.tensor(p)
            key_mask[b, T - len(p):] = True
    return idx.to(device), key_mask.to(device)


def right_pad(prompts, device="cpu", pad=0):
    """Token lists -> (B, T) long with each row's tokens at its start, and the index of each row's last token."""
    T = max(len(p) for p in prompts)
    idx = torch.full((len(prompts), T), pad, dtype=torch.long)
    for b, p in enumerate(prompts):
        idx[b, :len(p)] = torch.tensor(p)
    return idx.to(device), torch.tensor([len(p) - 1 for p in prompts], device=device)


# =====================================================================================================
# The loss
#   1. the plain loss: masked_cross_entropy on the full logits (forward's loss, the reference)
#   2. the chunked loss: chunked_cross_entropy, the same value and gradient without all the logits
#   3. which one runs: AutoRegressiveModel.training_loss -> lm_loss -> chunked_cross_entropy (the class)
# Positions that count, on every path: target != -1 (ignored) and loss_mask 1 (when there is a mask).
# =====================================================================================================

# ---- 1. the plain loss ----------------------------------------------------------------------------
# What model(idx, targets) returns (for users and tests) and what the chunked loss is tested against. The
# next-token training loss does not use it (2 says why); train_mntp.py's loss and evaluate.py's test loss do.

def masked_cross_entropy(logits, targets, loss_mask=None):
    """Mean cross-entropy of logits (..., V) against targets (...) over the positions that count: target
    != -1 and, with loss_mask (same shape as targets), mask 1. The reference for every other path."""
    flat_logits = logits.reshape(-1, logits.size(-1)).float()
    flat_targets = targets.reshape(-1)
    if loss_mask is None:
        return F.cross_entropy(flat_logits, flat_targets, ignore_index=-1)
    losses = F.cross_entropy(flat_logits, flat_targets, ignore_index=-1, reduction="none")
    weights = loss_mask.reshape(-1).to(losses.dtype) * (flat_targets != -1)   # a -1 target counts nowhere
    return (losses * weights).sum() / weights.sum().clamp(min=1.0)


def _scored_weights(targets, loss_mask):
    """(N,) float weights: 1 (or the loss mask) where the target counts, 0 where it is -1 (ignored)."""
    weights = (targets != -1).float()
    if loss_mask is not None:
        weights = weights * loss_mask.reshape(-1).float()
    return weights


def scored_tokens(targets, loss_mask=None):
    """How many positions a masked mean (masked_mean, masked_cross_entropy, chunked_cross_entropy) averages
    over: target != -1 and loss_mask 1. A float tensor on targets' device."""
    return _scored_weights(targets.reshape(-1), loss_mask).sum()


def masked_mean(values, targets, loss_mask=None):
    """Mean of per-position values over the positions that count (target != -1, loss_mask 1)."""
    weights = _scored_weights(targets.reshape(-1), loss_mask)
    return (values.reshape(-1).float() * weights).sum() / weights.sum().clamp(min=1.0)


# ---- 2. the chunked loss --------------------------------------------------------------------------
# Why: the logits are (N, V) for N = B * T positions, and GPT-2's vocabulary makes V = 50304. For a 64 x 256
# micro-batch that is 3.3 GB in fp32, and F.cross_entropy keeps them (and makes a gradient as large) until the
# backward pass. Here they exist one chunk of rows at a time (CHUNK_ELEMENTS: about 256 MB), and each chunk's
# gradients are computed right away, inside forward, while its logits exist: backward only scales them.
# Memory: one chunk instead of all logits. Time: no chunk is computed twice, and compiled (--compile) the head
# beats F.cross_entropy on all logits (H100, 256 x 256 tokens: 24.5 against 63.4 ms; eager 95 ms;
# bench/gpu_profile.py --head-only).
#     d loss / d logits_i = wt_i * (softmax(logits_i) - onehot(target_i))   wt_i: position i's weight / their sum
#     d loss / d h = (d loss / d logits) @ w,   d loss / d w = (d loss / d logits)^T @ h     (logits = h @ w^T)

# Rows of logits computed at once: chunk_rows x V fp32 values ~ 256 MB (GPT-2's vocabulary: 1334 rows).
CHUNK_ELEMENTS = 1 << 26


def _compute_dtype(h):
    """The matmul dtype: autocast's (bf16 on CUDA) when it is on, else h's; the Functions cast by themselves."""
    if torch.is_autocast_enabled(h.device.type):
        return torch.get_autocast_dtype(h.device.type)
    return h.dtype


def _chunk_rows(n_rows, vocab, chunk_rows=None):
    return max(1, min(n_rows, chunk_rows or CHUNK_ELEMENTS // vocab))


def chunk_loss_and_grads(hc, wd, t, wt, with_accuracy):
    """One chunk of the head's loss and its gradients. hc (n, C), wd (V, C): in the matmul dtype; t (n, 1) the
    targets (>= 0), wt (n, 1) their weights -> (sum of weighted losses, sum of weighted argmax hits (0 unless
    with_accuracy), d/d hc (n, C) fp32, d/d w (V, C) fp32). A function of its own so that --compile fuses the
    elementwise work on the (n, V) logits into two passes (bench/gpu_profile.py: eager, they were read and
    written about ten times, most of an H100 step).
        d loss / d logits = wt * softmax - wt * onehot(t)
    The onehot part touches one column per row, so it goes straight into the two products' results (a row of
    wd per row of hc, a row of hc per target row of d/d w): nothing (n, V) is scattered into, and under compile
    the softmax is written once, in the matmul dtype."""
    logits = (hc @ wd.t()).float()                                                 # (n, V) fp32
    hits = ((logits.argmax(1, keepdim=True) == t).float() * wt).sum() if with_accuracy else logits.new_zeros(())
    lse = torch.logsumexp(logits, dim=1, keepdim=True)                             # (n, 1)
    loss = ((lse - logits.gather(1, t)) * wt).sum()
    p = logits.sub_(lse).exp_().mul_(wt).to(hc.dtype)                              # wt * softmax, in place
    target_rows = t.squeeze(1)
    grad_h = (p @ wd).float() - wt * wd[target_rows].float()                       # (n, C)
    grad_w = (p.t() @ hc).float().index_add_(0, target_rows, -(wt * hc.float()))   # (V, C)
    return loss, hits, grad_h, grad_w


def chunk_token_losses(hc, wd, t):
    """One chunk of per-position losses, no gradient (evaluation): hc (n, C), wd (V, C), t (n, 1) targets
    (-1 = not scored) -> (losses (n,) fp32, argmax hits (n,) bool), 0 / False where t is -1."""
    logits = (hc @ wd.t()).float()                                                 # (n, V) fp32
    scored = t != -1
    losses = (torch.logsumexp(logits, 1, keepdim=True) - logits.gather(1, t.clamp(min=0))) * scored
    return losses.squeeze(1), ((logits.argmax(1, keepdim=True) == t) & scored).squeeze(1)


class _ChunkedCrossEntropy(torch.autograd.Function):
    """sum_i weights_i * CE(h_i @ w^T, targets_i) for h (N, C), w (V, C), one chunk of rows at a time.
    The loss is the last operation before .backward(), so the gradients are computed right here, chunk by
    chunk, while the chunk's logits exist (as Liger's fused linear cross-entropy does): no chunk is
    computed twice and no logits are kept for backward, which only scales the saved gradients.
    Optionally also the weighted accuracy of the argmax (no gradient)."""

    @staticmethod
    def forward(ctx, h, w, targets, weights, chunk_rows, with_accuracy, chunk_fn):
        dtype = _compute_dtype(h)
        with torch.autocast(h.device.type, enabled=False):
            wd = w.to(dtype)
            loss = torch.zeros((), dtype=torch.float32, device=h.device)
            hits = torch.zeros((), dtype=torch.float32, device=h.device)
            grad_h = torch.empty_like(h)                                        # (N, C)
            grad_w = torch.zeros(w.shape, dtype=torch.float32, device=w.device)  # (V, C), summed over chunks
            for start in range(0, h.size(0), chunk_rows):
                rows = slice(start, start + chunk_rows)
                chunk_loss, chunk_hits, chunk_grad_h, chunk_grad_w = chunk_fn(
                    h[rows].to(dtype), wd, targets[rows, None], weights[rows, None], with_accuracy)
                loss, hits = loss + chunk_loss, hits + chunk_hits
                grad_h[rows] = chunk_grad_h.to(h.dtype)
                grad_w += chunk_grad_w
        ctx.save_for_backward(grad_h, grad_w.to(w.dtype))
        ctx.mark_non_differentiable(hits)
        return loss, hits

    @staticmethod
    def backward(ctx, grad_loss, grad_hits):
        grad_h, grad_w = ctx.saved_tensors
        return grad_h * grad_loss.to(grad_h.dtype), grad_w * grad_loss.to(grad_w.dtype), None, None, None, None, None


def chunked_cross_entropy(h, w, targets, loss_mask=None, chunk_rows=None, with_accuracy=False,
                          chunk_fn=chunk_loss_and_grads, token_fn=chunk_token_losses):
    """masked_cross_entropy(h @ w^T, targets, loss_mask) for h (..., C), w (V, C), without all the logits at
    once; with_accuracy: returns (loss, accuracy of the argmax over the same weights) instead. chunk_fn and
    token_fn compute one chunk (with and without gradient): the model passes its compiled ones under --compile.
    Without a gradient to compute (evaluation, torch.no_grad) it sums chunked_token_losses instead."""
    h2 = h.reshape(-1, h.size(-1))                                     # (N, C)
    flat_targets = targets.reshape(-1)                                 # (N,)
    weights = _scored_weights(flat_targets, loss_mask)
    total = weights.sum().clamp(min=1.0)
    rows = _chunk_rows(h2.size(0), w.size(0), chunk_rows)
    if torch.is_grad_enabled() and (h2.requires_grad or w.requires_grad):
        loss, hits = _ChunkedCrossEntropy.apply(h2, w, flat_targets.clamp(min=0),
                                                weights / total, rows, with_accuracy, chunk_fn)
        return (loss, hits) if with_accuracy else loss
    losses, hit = chunked_token_losses(h2, w, flat_targets, rows, token_fn)
    loss = (losses * weights).sum() / total
    return (loss, (hit.float() * weights).sum() / total) if with_accuracy else loss


def chunked_token_losses(h, w, targets, chunk_rows=None, token_fn=chunk_token_losses):
    """Evaluation: per-position cross-entropy (fp32) and argmax hits of h @ w^T against targets, without gradient and
    one chunk of rows at a time. h (..., C), targets (...); both outputs have targets' shape (0 where -1)."""
    h2 = h.reshape(-1, h.size(-1))
    flat = targets.reshape(-1)
    rows = _chunk_rows(h2.size(0), w.size(0), chunk_rows)
    dtype = _compute_dtype(h2)
    losses, hits = [], []
    with torch.no_grad(), torch.autocast(h2.device.type, enabled=False):
        wd = w.to(dtype)
        for start in range(0, h2.size(0), rows):
            chunk_losses, chunk_hits = token_fn(h2[start:start + rows].to(dtype), wd, flat[start:start + rows, None])
            losses.append(chunk_losses)
            hits.append(chunk_hits)
    return torch.cat(losses).view(targets.shape), torch.cat(hits).view(targets.shape)


# ---- 3. which path runs: the model ----------------------------------------------------------------

class AutoRegressiveModel(nn.Module):
    name = None            # the registry name, set by the registry (models.model_module)
    supports_kv_cache = False
    # One chunk of the head's loss (with gradients) and of its per-position losses; --compile replaces them by
    # compiled ones on the instance (speed.compile_model).
    chunk_loss = staticmethod(chunk_loss_and_grads)
    chunk_token_losses = staticmethod(chunk_token_losses)

    # ---- the loss: what the trainer calls ---------------------------------------------------
    def training_loss(self, x, y, loss_mask=None, step=0, key_mask=None):
        """One micro-batch of training -> (loss, {metric: value}). The default is the next-token loss, chunked:
        lm_loss. A model with another objective overrides this (dual_mask_gpt: fw and bw)."""
        return self.lm_loss(x, y, loss_mask, key_mask), {}

    def lm_loss(self, idx, targets, loss_mask=None, key_mask=None, with_accuracy=False, **features_kwargs):
        """masked_cross_entropy(self(idx)[0], targets, loss_mask), computed as chunked_cross_entropy(features
        through the head's operands): the same value and gradient without the (B, T, V) logits.
        features_kwargs go to features() (dual_mask_gpt: direction). with_accuracy: (loss, accuracy)."""
        if key_mask is not None:
            features_kwargs["key_mask"] = key_mask
        operands = self.head_operands(self.features(idx, **features_kwargs)) if self.has_features() else None
        if operands is None:  # a model without features()/head operands: the plain loss on the full logits
            logits, _ = self(idx, **features_kwargs)
            loss = masked_cross_entropy(logits, targets, loss_mask)
            if not with_accuracy:
                return loss
            return loss, masked_mean((logits.argmax(-1) == targets).float(), targets, loss_mask)
        return chunked_cross_entropy(*operands, targets, loss_mask, with_accuracy=with_accuracy,
                                     chunk_fn=self.chunk_loss, token_fn=self.chunk_token_losses)

    def evaluation_losses(self, x, y, loss_mask=None):
        """One batch of evaluation -> {"loss": mean over the positions that count, ...}."""
        losses, _ = self.lm_token_losses(x, y)
        return {"loss": masked_mean(losses, y, loss_mask)}

    @torch.no_grad()
    def lm_token_losses(self, idx, targets, key_mask=None, **features_kwargs):
        """(losses, hits), both shaped like targets: each position's cross-entropy and whether the argmax
        is the target; chunked, for evaluation."""
        if key_mask is not None:
            features_kwargs["key_mask"] = key_mask
        operands = self.head_operands(self.features(idx, **features_kwargs)) if self.has_features() else None
        if operands is None:
            logits, _ = self(idx, **features_kwargs)
            flat = F.cross_entropy(logits.reshape(-1, logits.size(-1)).float(), targets.reshape(-1),
                                   ignore_index=-1, reduction="none")
            return flat.view(targets.shape), (logits.argmax(-1) == targets) & (targets != -1)
        return chunked_token_losses(*operands, targets, token_fn=self.chunk_token_losses)

    def head_operands(self, h):
        """(a, b) with logits = a @ b^T, for the model's head (tied or CLAP); None if it has no such head."""
        if isinstance(getattr(self, "head", None), nn.Module) and hasattr(self.head, "operands") \
                and isinstance(getattr(self, "wte", None), nn.Embedding):
            return self.head.operands(h, self.wte.weight)
        return None

    def has_features(self):
        return type(self).features is not AutoRegressiveModel.features

    # ---- the other training hooks -----------------------------------------------------------
    def on_train_step(self, step, max_steps):
        return False

    def log_fields(self):
        return {}

    def extra_state(self):
        return {}

    def load_extra_state(self, state):
        pass

    def prepare_for_inference(self):
        pass

    def memory_probe_model(self):
        """The model in the state whose training step needs the most memory (a copy where that differs,
        e.g. the last stage), for the trainer's --micro-batch-size auto probe."""
        return self

    # ---- the network ----------------------------------------------------------------------
    def features(self, idx, key_mask=None):
        """Final hidden states (B, T, C) of idx (B, T): after the final LayerNorm, before the head."""
        raise NotImplementedError(f"{type(self).__name__} does not expose features()")

    # ---- generation -----------------------------------------------------------------------
    def forward_cached(self, idx, cache, key_mask=None):
        """Logits (B, T, V) of idx placed after the cache.pos columns already in `cache`; advances it.
        key_mask (B, T) bool marks the real tokens of a left-padded prompt (False = padding); positions are
        counted per row by the cache (cache.positions), so a padded row is computed as if unpadded."""
        raise NotImplementedError

    def new_cache(self, batch_size, device, dtype, extra_columns=0):
        """A KVCache for batch_size rows with room for the model's context plus extra_columns (left padding)."""
        raise NotImplementedError

    @torch.no_grad()
    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=None, use_cache=True, generator=None,
                 vocab_limit=None, prompt_lengths=None, eos_token=None, stop=None):
        """Continue B prompts at once; returns (B, T + n) long: idx followed by each row's new tokens.

        idx (B, T): the prompts, left-padded: row b's prompt is its last prompt_lengths[b] tokens (default:
            all T; left_pad() builds idx and prompt_lengths from lists). temperature 0 or top_k=1 is greedy.
        Stops: a row stops after it generated eos_token, or as soon as stop(new_tokens) is True (new_tokens:
            the row's generated token ids so far, a list; e.g. a stop string in its decoded text). A stopped row
            is filled with eos_token (or its last token) and costs nothing more; generation ends when every
            row has stopped or after max_new_tokens (n <= max_new_tokens).
        vocab_limit keeps sampling below the tokenizer's size (the embedding table is padded to a multiple
            of 64).

        The context window: each row's context is its tokens from a start that slides. It starts at the
        row's last block_size tokens; when a new token would make it longer than block_size, it restarts
        from the row's last block_size // 2 tokens (so a row always sees between block_size // 2 and
        block_size tokens). Sliding by half a window, not by one token: with learned absolute positions
        every slide invalidates the cached keys (they sit at the wrong positions), so a one-token slide
        would recompute the whole window for every token; this way it is one refill per block_size // 2
        tokens. Both paths below use the same contexts, so they give the same tokens.

        With the KV cache (use_cache and a model that has one): the contexts are left-padded to a common
        length and fed once, padding hidden by a key mask and positions counted per row (so a padded row
        computes exactly what it would alone, learned absolute positions included); then one token per row
        and step against the same cache. A row whose context slides is recomputed alone (one forward of
        block_size // 2 - 1 tokens) and its cache row replaced, left-padded; the other rows keep theirs. Rows
        that stop leave the batch (the cache keeps the others' columns).
        Without a cache (conv_attention, use_cache=False): every step recomputes each row's context,
        right-padded to a common length; the model is causal, so right padding changes no logit that is
        read. Both paths give the tokens that each row alone would get (tests/test_generate.py)."""
        if getattr(self.config, "attention", "causal") != "causal":
            raise ModelConfigError(f"this model attends {self.config.attention}ly (an encoder, e.g. for "
                                   f"MNTP): it does not predict the next token and cannot generate text")
        B, T = idx.shape
        lengths = [T] * B if prompt_lengths is None else [int(n) for n in prompt_lengths]
        if B == 0 or T == 0 or not all(1 <= n <= T for n in lengths):
            raise ValueError(f"every prompt needs 1..{T} tokens (e.g. <|endoftext|> to start a new document)")
        rows = [idx[b, T - n:].tolist() for b, n in enumerate(lengths)]   # each row's tokens so far
        new = [[] for _ in range(B)]
        active = list(range(B))            # rows still generating, in batch order of the cache
        use_cache = use_cache and self.supports_kv_cache and self.config.block_size >= 4  # (a slide keeps >= 2)
        window, cache, device = self.config.block_size, None, idx.device
        starts = [max(0, n - window) for n in lengths]     # where each row's context starts
        dtype = next(self.parameters()).dtype
        for _ in range(max_new_tokens):
            slid = []                                      # batch rows whose context restarts now
            for i, b in enumerate(active):
                if len(rows[b]) - starts[b] > window:      # the window slides by half its length
                    starts[b] = len(rows[b]) - max(1, window // 2)
                    slid.append(i)
            contexts = [rows[b][starts[b]:] for b in active]
            if not use_cache:
                context, last = right_pad(contexts, device)
                logits = self(context)[0][torch.arange(len(active), device=device), last]
            elif cache is None:                            # feed the prompts (columns to spare for padding)
                context, key_mask = left_pad(contexts, device)
                cache = self.new_cache(len(active), device, dtype, extra_columns=window)
                logits = self.forward_cached(context, cache, None if key_mask.all() else key_mask)[:, -1]
            else:
                if cache.pos == cache.max_len:             # drop the columns that are padding in every row
                    cache.keep_rows(list(range(len(active))))
                for i in slid:  # its positions changed: recompute its new context alone, into its cache row
                    row_cache = self.new_cache(1, device, dtype)
                    self.forward_cached(torch.tensor([contexts[i][:-1]], device=device), row_cache)
                    cache.replace_row(i, row_cache)
                last_tokens = torch.tensor([[rows[b][-1]] for b in active], device=device)
                logits = self.forward_cached(last_tokens, cache)[:, -1]
            next_tokens = self.sample(logits.float(), temperature, top_k, generator, vocab_limit).tolist()
            still = []
            for i, (b, token) in enumerate(zip(active, next_tokens)):
                rows[b].append(token)
                new[b].append(token)
                if token != eos_token and not (stop is not None and stop(new[b])):
                    still.append(i)
            if len(still) < len(active):
                active = [active[i] for i in still]
                if not active:
                    break
                if cache is not None:
                    cache.keep_rows(still)
        n = max(len(t) for t in new) if new else 0
        out = idx.new_empty(B, T + n)
        out[:, :T] = idx
        for b, tokens in enumerate(new):
            fill = eos_token if eos_token is not None else (tokens[-1] if tokens else 0)
            out[b, T:] = torch.tensor(tokens + [fill] * (n - len(tokens)), dtype=idx.dtype)
        return out

    @staticmethod
    def sample(logits, temperature=1.0, top_k=None, generator=None, vocab_limit=None):
        """Next tokens (B,) from last-position logits (B, V): argmax when greedy, else softmax sampling."""
        if vocab_limit is not None:
            logits[:, vocab_limit:] = float("-inf")
        if temperature == 0 or top_k == 1:
            return logits.argmax(dim=-1)
        logits = logits / temperature
        if top_k is not None:
            kth = torch.topk(logits, min(top_k, logits.size(-1))).values[:, [-1]]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        return torch.multinomial(F.softmax(logits, dim=-1), 1, generator=generator)[:, 0]

    # ---- bookkeeping ----------------------------------------------------------------------
    def num_params(self, trainable_only=False):
        return sum(p.numel() for p in self.parameters() if p.requires_grad or not trainable_only)

    def config_dict(self):
        return dataclasses.asdict(self.config)
