"""
AutoRegressiveModel: what every model in models/ is, and what the trainer and generate.py rely on.

The forward contract
    logits, loss = model(idx, targets=None, key_mask=None)
    idx (B, T) long with T <= block_size (longer works where the positions allow it: pos alibi, sinusoidal,
    none); logits (B, T, V) for every position; loss a scalar or None.
    In the forward direction the logits at position i depend only on idx[:, :i+1] (tests prove it).
    key_mask (B, T) bool, aligned with idx: False marks filler / padding tokens that no other position may
    attend to (each position still attends to itself). A model that cannot honour it raises ValueError.
    hidden = model.features(idx, key_mask=None): the final hidden states (B, T, C) after the final
    LayerNorm, before the head, one row per idx position (for embeddings; forward is head(features)).

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
"""

import dataclasses
import os

import torch
import torch.nn as nn
import torch.nn.functional as F

CHECKPOINT_FORMAT = "lmsmall-checkpoint-v1"


class CheckpointError(Exception):
    """A checkpoint that cannot be used; the message says why and what to do."""


def masked_cross_entropy(logits, targets, loss_mask=None):
    """Mean cross-entropy over positions; with loss_mask (B, T) only positions where it is 1 count.
    Targets equal to -1 are ignored."""
    flat_logits = logits.reshape(-1, logits.size(-1)).float()
    flat_targets = targets.reshape(-1)
    if loss_mask is None:
        return F.cross_entropy(flat_logits, flat_targets, ignore_index=-1)
    losses = F.cross_entropy(flat_logits, flat_targets, ignore_index=-1, reduction="none")
    weights = loss_mask.reshape(-1).to(losses.dtype)
    return (losses * weights).sum() / weights.sum().clamp(min=1.0)


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


class AutoRegressiveModel(nn.Module):
    name = None            # registry name, set by each model
    supports_kv_cache = False

    # ---- training hooks -------------------------------------------------------------------
    def training_loss(self, x, y, loss_mask=None, step=0, key_mask=None):
        if loss_mask is None and key_mask is None:  # the loss inside forward: compiled with the head
            return self(x, y)[1], {}
        logits, _ = self(x, key_mask=key_mask)
        return masked_cross_entropy(logits, y, loss_mask), {}

    def evaluation_losses(self, x, y, loss_mask=None):
        logits, _ = self(x)
        return {"loss": masked_cross_entropy(logits, y, loss_mask)}

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
            from models import ModelConfigError
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

    @staticmethod
    def load_checkpoint_file(path, map_location="cpu"):
        """Read and validate a checkpoint file; CheckpointError with a one-line reason otherwise.
        hf:NAME_OR_DIR is a Hugging Face GPT-2 (the Hub or a local folder), converted by convert_hf.py."""
        if str(path).startswith("hf:"):
            from convert_hf import checkpoint_from_hf
            return checkpoint_from_hf(str(path)[3:])
        if not os.path.isfile(path):
            raise CheckpointError(f"no checkpoint at {path}")
        try:
            ckpt = torch.load(path, map_location=map_location, weights_only=True)
        except Exception as e:  # truncated, not a torch file, or unpickling refused
            reason = str(e).strip().splitlines()[0][:120] if str(e).strip() else type(e).__name__
            raise CheckpointError(f"cannot read checkpoint {path} ({reason}); it is corrupt or not an "
                                  f"lmsmall checkpoint") from None
        if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
            raise CheckpointError(f"{path} is not an lmsmall checkpoint (no '{CHECKPOINT_FORMAT}' marker)")
        return ckpt

    @classmethod
    def from_checkpoint(cls, path, device="cpu", for_inference=True):
        """Rebuild the model stored in an lmsmall checkpoint (any registered model)."""
        from models import create_model
        ckpt = cls.load_checkpoint_file(path)
        model = create_model(ckpt["model_name"], preset=None, **ckpt["model_config"])
        model.load_extra_state(ckpt.get("model_extra_state", {}))
        try:
            model.load_state_dict(ckpt["model_state"])
        except RuntimeError as e:
            raise CheckpointError(f"checkpoint {path} does not match model {ckpt['model_name']}: "
                                  f"{str(e).splitlines()[0]}") from None
        model.to(device)
        if for_inference:
            model.prepare_for_inference()
            model.eval()
        return model, ckpt
