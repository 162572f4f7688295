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
    def forward_cached(self, idx, cache):
        """Logits (B, T, V) of idx placed after the cache.pos tokens already in `cache`; advances it."""
        raise NotImplementedError

    def new_cache(self, batch_size, device, dtype):
        raise NotImplementedError

    @torch.no_grad()
    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=None, use_cache=True, generator=None,
                 vocab_limit=None):
        """Append max_new_tokens sampled tokens to idx (B, T). temperature 0 or top_k=1 is greedy.
        A prompt longer than block_size is cropped to its last block_size tokens. vocab_limit keeps
        sampling below the tokenizer's size (the embedding table is padded to a multiple of 64)."""
        if getattr(self.config, "attention", "causal") != "causal":
            from models import ModelConfigError
            raise ModelConfigError(f"this model attends {self.config.attention}ly (an encoder, e.g. for "
                                   f"MNTP): it does not predict the next token and cannot generate text")
        block_size = self.config.block_size
        cache = None
        use_cache = use_cache and self.supports_kv_cache
        for _ in range(max_new_tokens):
            if use_cache and cache is not None and cache.pos < block_size:
                logits = self.forward_cached(idx[:, -1:], cache)  # one new token against the cache
            else:
                context = idx[:, -block_size:]
                if use_cache:
                    # (Re)fill the cache from the context window: at the start, and whenever the window
                    # slid (learned positions are absolute, so old keys would be at the wrong position).
                    cache = self.new_cache(idx.size(0), idx.device, next(self.parameters()).dtype)
                    logits = self.forward_cached(context, cache)
                else:
                    logits, _ = self(context)
            logits = logits[:, -1, :].float()
            if vocab_limit is not None:
                logits[:, vocab_limit:] = float("-inf")
            if temperature == 0 or top_k == 1:
                next_token = logits.argmax(dim=-1, keepdim=True)
            else:
                logits = logits / temperature
                if top_k is not None:
                    kth = torch.topk(logits, min(top_k, logits.size(-1))).values[:, [-1]]
                    logits = logits.masked_fill(logits < kth, float("-inf"))
                probs = F.softmax(logits, dim=-1)
                next_token = torch.multinomial(probs, 1, generator=generator)
            idx = torch.cat([idx, next_token], dim=1)
        return idx

    # ---- bookkeeping ----------------------------------------------------------------------
    def num_params(self, trainable_only=False):
        return sum(p.numel() for p in self.parameters() if p.requires_grad or not trainable_only)

    def config_dict(self):
        return dataclasses.asdict(self.config)

    @staticmethod
    def load_checkpoint_file(path, map_location="cpu"):
        """Read and validate a checkpoint file; CheckpointError with a one-line reason otherwise."""
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
