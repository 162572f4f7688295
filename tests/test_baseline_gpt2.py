"""Baseline GPT-2: sizes, initialisation and the KV cache."""

import math

import torch

from components import KVCache
from models import create_model


def test_rtx3080_preset_is_the_seed_size():
    model = create_model("baseline_gpt2", preset="rtx3080")
    c = model.config
    assert (c.n_layer, c.n_head, c.n_embd, c.block_size) == (12, 6, 192, 256)
    # wte is tied to the head, so it counts once: 50304*192 + 256*192 + 12 blocks of (12*192^2 + 13*192)
    blocks = 12 * (12 * 192 * 192 + 13 * 192)
    assert model.num_params() == 50304 * 192 + 256 * 192 + blocks + 2 * 192


def test_initial_loss_is_uniform_guess():
    torch.manual_seed(0)
    model = create_model("baseline_gpt2", preset="tiny", vocab_size=320)
    idx, targets = torch.randint(0, 320, (2, 4, 64))
    _, loss = model(idx, targets)  # (targets = idx would not do: the tied head favours the input token)
    assert abs(loss.item() - math.log(320)) < 0.2


def test_cache_step_by_step_matches_full_forward():
    torch.manual_seed(0)
    model = create_model("baseline_gpt2", preset="tiny", vocab_size=320).eval()
    idx = torch.randint(0, 320, (2, 20))
    full = model(idx)[0]
    cache = model.new_cache(2, "cpu", torch.float32)
    assert isinstance(cache, KVCache)
    parts = [model.forward_cached(idx[:, :7], cache)]
    parts += [model.forward_cached(idx[:, t:t + 1], cache) for t in range(7, 20)]
    torch.testing.assert_close(torch.cat(parts, dim=1), full, rtol=1e-5, atol=1e-5)
