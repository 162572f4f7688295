"""
--muon-qkv (optim.py): split (the default) orthogonalises the q, k and v row blocks of attention's (3C, C) c_attn
weight separately, each exactly as torch's Muon would a (C, C) matrix of its own; fused orthogonalises the whole
(3C, C) matrix as one (torch's Muon, as before the option). The other matrices are stepped the same way in both.
"""

import pytest
import torch
import torch.nn as nn

import optim
from models import create_model
from plumbing.trainer_config import resolve_config
from test_modern import CFG

C = 8


class Attn(nn.Module):
    def __init__(self):
        super().__init__()
        self.c_attn = nn.Linear(C, 3 * C)
        self.c_proj = nn.Linear(C, C)


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.attn = Attn()


def grads(step):
    """Gradients that differ per step and per q/k/v block, so momentum and each block's scale matter."""
    g = torch.Generator().manual_seed(100 + step)
    return torch.randn(3 * C, C, generator=g) * torch.tensor([1.0, 5.0, 0.2]).repeat_interleave(C)[:, None], \
        torch.randn(C, C, generator=g)


def train(qkv, steps=3):
    torch.manual_seed(0)
    net = Net()
    opt = optim.build_optimizer(net, dict(CFG, muon_qkv=qkv))
    for step in range(steps):
        g_attn, g_proj = grads(step)
        net.attn.c_attn.weight.grad, net.attn.c_proj.weight.grad = g_attn.clone(), g_proj.clone()
        for p in (net.attn.c_attn.bias, net.attn.c_proj.bias):
            p.grad = torch.zeros_like(p)
        opt.step()
    return net


def reference(split, steps=3):
    """torch.optim.Muon by hand: on the whole (3C, C) matrix (split=False) or on three separate (C, C) ones."""
    torch.manual_seed(0)
    net = Net()
    w = net.attn.c_attn.weight.detach()
    mats = [w[i * C:(i + 1) * C].clone() for i in range(3)] if split else [w.clone()]
    mats = [nn.Parameter(m) for m in mats] + [nn.Parameter(net.attn.c_proj.weight.detach().clone())]
    opt = torch.optim.Muon(mats, lr=CFG["muon_lr"], momentum=CFG["muon_momentum"],
                           weight_decay=CFG["muon_weight_decay"], nesterov=True)
    for step in range(steps):
        g_attn, g_proj = grads(step)
        for m, g in zip(mats, [*(g_attn.chunk(3) if split else [g_attn]), g_proj]):
            m.grad = g.clone()
        opt.step()
    return torch.cat([m.detach() for m in mats[:-1]]), mats[-1].detach()


def test_split_is_three_separate_orthogonalisations_and_fused_is_one():
    for qkv, split in (("fused", False), ("split", True)):
        net = train(qkv)
        want_attn, want_proj = reference(split)
        torch.testing.assert_close(net.attn.c_attn.weight.detach(), want_attn, rtol=0, atol=1e-6)
        torch.testing.assert_close(net.attn.c_proj.weight.detach(), want_proj, rtol=0, atol=1e-6)
    # the two modes really differ (else the test above could not tell them apart)
    assert (train("fused").attn.c_attn.weight - train("split").attn.c_attn.weight).abs().max() > 1e-3


def test_fused_is_torchs_muon_unchanged():
    net = Net()
    muon = optim.build_optimizer(net, dict(CFG, muon_qkv="fused")).optimizers["muon"]
    assert type(muon) is torch.optim.Muon and len(muon.param_groups) == 1
    # split is the default (docs/results/muon_qkv.md); a config without the key is a run from before it: fused
    assert optim.DEFAULTS["muon_qkv"] == "split"
    assert type(optim.build_optimizer(net, CFG).optimizers["muon"]) is torch.optim.Muon


def test_split_finds_every_blocks_qkv_weight_in_a_real_model():
    model = create_model("baseline_gpt2", "tiny")
    qkv = optim.qkv_parameters(model)
    n = model.config.n_embd
    assert len(qkv) == model.config.n_layer and all(p.shape == (3 * n, n) for p in qkv)
    muon = optim.build_optimizer(model, dict(CFG, muon_qkv="split")).optimizers["muon"]
    split_group = [g for g in muon.param_groups if g.get("row_blocks") == 3]
    assert len(split_group) == 1 and {id(p) for p in split_group[0]["params"]} == {id(p) for p in qkv}
    assert {id(p) for g in muon.param_groups for p in g["params"]} == {id(p) for p in optim.muon_parameters(model)}


def test_flag_is_recorded_and_checked():
    assert resolve_config("baseline_gpt2", ["--muon-qkv", "split"])[0]["muon_qkv"] == "split"
    assert resolve_config("baseline_gpt2", [])[0]["muon_qkv"] == "split"
    with pytest.raises(SystemExit):
        resolve_config("baseline_gpt2", ["--muon-qkv", "rows"])
