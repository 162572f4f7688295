"""
The optimizers: AdamW (GPT-2's recipe, the default) or Muon + AdamW (the NanoGPT speedrun's).

    --optimizer adamw   AdamW over every trainable parameter; weight decay on matrices and embeddings only
    --optimizer muon    torch.optim.Muon (momentum, Nesterov, then a Newton-Schulz orthogonalisation of the
                        update) for the weight matrices of the hidden nn.Linear layers: attention q/k/v and output
                        projections, MLP layers, conv_attention's shorten/upsample projections.
                        AdamW, as with --optimizer adamw, for everything else: the token embedding (which is also
                        the tied output head), learned position table, norms, biases, CLAP's beta, and LoRA's
                        low-rank factors A and B (rank r; orthogonalising an r-column update would make its
                        every direction as large as the main one)

--muon-qkv split (the default) orthogonalises the three (C, C) row blocks q, k and v of attention's c_attn weight
(3C, C) separately, as the NanoGPT speedrun does, each with the learning rate Muon gives a (C, C) matrix;
--muon-qkv fused orthogonalises the whole (3C, C) matrix as one (the only way before the option existed, so a
config without muon_qkv means fused). Split gave a lower val loss on every seed, p < 0.05, at two CPU sizes:
docs/results/muon_qkv.md.

Muon's learning rate is --muon-lr (0.02, Keller Jordan's default; torch scales it by sqrt(max(1, rows/cols))
per matrix), following the trainer's schedule: every step the trainer sets lr_at(step) * group["lr_scale"],
where lr_scale = muon_lr / lr for Muon's group and 1 for AdamW's. Muon's momentum is --muon-momentum (0.95) and
its decoupled weight decay --muon-weight-decay (0 as in the speedrun; torch applies lr * wd per step, so 0.1
with lr 0.02 would shrink weights ~7x faster than AdamW's 0.1 at lr 3e-3).

DDP: every rank steps on the same all-reduced gradients, and the Newton-Schulz iteration is deterministic, so the
ranks stay identical (the speedrun splits the matrices over ranks to save time; not needed at this size).
Checkpoints hold both optimizers' state ({"muon": ..., "adamw": ...}), so --resume continues exactly.
"""

import torch
import torch.nn as nn

from plumbing import cli

OPTIMIZERS = ("adamw", "muon")
MUON_QKV = ("fused", "split")
DEFAULTS = dict(optimizer="adamw", muon_lr=0.02, muon_momentum=0.95, muon_weight_decay=0.0, muon_qkv="split")


def add_optimizer_arguments(p):
    p.add_argument("--optimizer", choices=OPTIMIZERS, help="adamw (default) | muon: Muon for the hidden weight "
                   "matrices, AdamW (--lr) for embeddings, norms, biases (optim.py)")
    p.add_argument("--muon-lr", type=cli.positive_float, help="Muon's peak learning rate (default 0.02), same schedule as --lr")
    p.add_argument("--muon-momentum", type=cli.probability, help="Muon's Nesterov momentum (default 0.95)")
    p.add_argument("--muon-weight-decay", type=cli.nonnegative_float, help="Muon's decoupled weight decay (default 0)")
    p.add_argument("--muon-qkv", choices=MUON_QKV, help="split (default): orthogonalise attention's q, k and v "
                   "weights each on its own, as the speedrun does | fused: as one (3C, C) matrix")


def muon_parameters(model):
    """The trainable parameters Muon takes: the weight matrix of every nn.Linear (LoRALinear's A and B are not
    nn.Linear weights; its frozen base does not train). Everything else goes to AdamW."""
    return [m.weight for m in model.modules()
            if isinstance(m, nn.Linear) and m.weight.requires_grad and m.weight.dim() == 2]


def qkv_parameters(model):
    """The fused q/k/v weights among Muon's matrices: every nn.Linear named c_attn whose weight is (3C, C)."""
    return [m.weight for name, m in model.named_modules()
            if name.split(".")[-1] == "c_attn" and isinstance(m, nn.Linear) and m.weight.requires_grad
            and m.weight.shape[0] == 3 * m.weight.shape[1]]


class SplitMuon(torch.optim.Muon):
    """torch.optim.Muon, except that a group with "row_blocks": k splits each matrix's update into k equal row
    blocks and orthogonalises each on its own, with the learning rate Muon gives a matrix of the block's shape.
    The step does what torch's _single_tensor_muon does, with that one change."""

    @torch.no_grad()
    def step(self, closure=None):
        # torch's own Newton-Schulz and learning-rate rule, so that a block gets exactly what Muon gives a matrix
        # (private names of torch.optim._muon: imported here, so that only --muon-qkv split depends on them)
        from torch.optim._muon import _adjust_lr, _zeropower_via_newtonschulz
        for group in self.param_groups:
            lr, k = group["lr"], group.get("row_blocks", 1)
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(p.grad, memory_format=torch.preserve_format)
                buf = state["momentum_buffer"]
                buf.lerp_(p.grad, 1 - group["momentum"])
                update = p.grad.lerp(buf, group["momentum"]) if group["nesterov"] else buf
                p.mul_(1 - lr * group["weight_decay"])
                for p_block, u_block in zip(p.chunk(k), update.chunk(k)):  # row views of p: updated in place
                    ortho = _zeropower_via_newtonschulz(u_block, ns_coefficients=group["ns_coefficients"],
                                                        ns_steps=group["ns_steps"], eps=group["eps"])
                    p_block.add_(ortho, alpha=-_adjust_lr(lr, group["adjust_lr_fn"], p_block.shape))


def adamw(params, cfg, fused, lr_scale=1.0):
    """GPT-2's AdamW: weight decay on matrices and embeddings (dim >= 2), none on norms, biases, scalars."""
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg["weight_decay"]},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    for g in groups:
        g["lr_scale"] = lr_scale
    return torch.optim.AdamW(groups, lr=cfg["lr"], betas=(0.9, 0.95), eps=1e-8, fused=fused)


class MuonWithAdamW:
    """Muon for the hidden matrices and AdamW for the rest, used by the trainer as one optimizer:
    param_groups (both optimizers' groups), zero_grad, step, state_dict, load_state_dict."""

    def __init__(self, muon, adamw):
        self.optimizers = {"muon": muon, "adamw": adamw}

    @property
    def param_groups(self):
        return [g for opt in self.optimizers.values() for g in opt.param_groups]

    def zero_grad(self, set_to_none=True):
        for opt in self.optimizers.values():
            opt.zero_grad(set_to_none=set_to_none)

    def step(self):
        for opt in self.optimizers.values():
            opt.step()

    def state_dict(self):
        return {name: opt.state_dict() for name, opt in self.optimizers.items()}

    def load_state_dict(self, state):
        if set(state) != set(self.optimizers):
            raise ValueError(f"optimizer state holds {sorted(state)}, expected {sorted(self.optimizers)}")
        for name, opt in self.optimizers.items():
            opt.load_state_dict(state[name])


def build_optimizer(model, cfg, fused=False):
    """The optimizer cfg["optimizer"] asks for, over exactly the parameters of `model` that require grad."""
    kind = cfg.get("optimizer", "adamw")
    if kind not in OPTIMIZERS:
        raise ValueError(f"--optimizer {kind!r} unknown; choose one of: {', '.join(OPTIMIZERS)}")
    params = [p for p in model.parameters() if p.requires_grad]
    if kind == "adamw":
        return adamw(params, cfg, fused)
    hidden = muon_parameters(model)
    in_muon = {id(p) for p in hidden}
    lr_scale = cfg["muon_lr"] / cfg["lr"]
    kwargs = dict(lr=cfg["muon_lr"], momentum=cfg["muon_momentum"], weight_decay=cfg["muon_weight_decay"], nesterov=True)
    mode = cfg.get("muon_qkv", "fused")  # a config from before --muon-qkv existed was fused
    if mode not in MUON_QKV:
        raise ValueError(f"--muon-qkv {mode!r} unknown; choose one of: {', '.join(MUON_QKV)}")
    if mode == "fused":
        muon = torch.optim.Muon([{"params": hidden, "lr_scale": lr_scale}], **kwargs)
    else:
        try:  # SplitMuon.step uses two private functions of torch's Muon: say so at once if this torch lacks them
            from torch.optim._muon import _adjust_lr, _zeropower_via_newtonschulz  # noqa: F401
        except ImportError:
            raise cli.UsageError(f"--muon-qkv split needs torch.optim._muon's Newton-Schulz (torch "
                                 f"{torch.__version__} lacks it); give --muon-qkv fused") from None
        qkv = {id(p) for p in qkv_parameters(model)}
        groups = [{"params": [p for p in hidden if id(p) not in qkv], "lr_scale": lr_scale},
                  {"params": [p for p in hidden if id(p) in qkv], "lr_scale": lr_scale, "row_blocks": 3}]
        muon = SplitMuon([g for g in groups if g["params"]], **kwargs)
    return MuonWithAdamW(muon, adamw([p for p in params if id(p) not in in_muon], cfg, fused))


def parts(optimizer):
    """The torch optimizers inside `optimizer` (itself, or Muon's and AdamW's)."""
    return list(optimizer.optimizers.values()) if isinstance(optimizer, MuonWithAdamW) else [optimizer]


def carry_optimizer_state(old, new, origins=None):
    """Move the state (Adam's moments, Muon's momentum) from optimizer `old` to `new`, which the trainer built
    after the set of trainable parameters changed: a parameter that stays keeps its own; a new parameter copied
    from another (origins: {copy: source}, e.g. progressive_diverging's new blocks) starts with a copy of its
    source's state, so the copies do not restart from zero momentum (which makes Adam's first updates lr-sized
    whatever the gradient, and bumps the loss). State moves only between optimizers of the same kind."""
    origins = origins or {}
    for target in parts(new):
        source = {p: s for opt in parts(old) if type(opt) is type(target) for p, s in opt.state.items()}
        for group in target.param_groups:
            for p in group["params"]:
                if p in source:
                    target.state[p] = source[p]
                elif origins.get(p) in source:
                    target.state[p] = {k: v.clone() if torch.is_tensor(v) else v
                                       for k, v in source[origins[p]].items()}
