"""The contract of DESIGN.md, checked for every registered model at its tiny preset."""

import pytest
import torch

from models import MODELS, ModelConfigError, create_model

VOCAB = 64


def tiny(name, **overrides):
    torch.manual_seed(0)
    model = create_model(name, preset="tiny", vocab_size=VOCAB, **overrides)
    return model.eval()


@pytest.mark.parametrize("name", list(MODELS))
def test_logits_for_every_position_and_any_length(name):
    model = tiny(name)
    for T in (1, 7, 64, model.config.block_size):
        idx = torch.randint(0, VOCAB - 8, (2, T))
        logits, loss = model(idx)
        assert logits.shape == (2, T, model.config.vocab_size) and loss is None
        logits, loss = model(idx, idx)
        assert loss.dim() == 0 and torch.isfinite(loss)


@pytest.mark.parametrize("name", list(MODELS))
def test_forward_is_leak_free(name):
    """Changing tokens at positions >= j leaves the logits at positions < j exactly as they were."""
    model = tiny(name)
    T = min(100, model.config.block_size)
    g = torch.Generator().manual_seed(1)
    idx = torch.randint(0, VOCAB - 8, (2, T), generator=g)
    with torch.no_grad():
        base = model(idx)[0]
        for j in (1, 2, 3, 4, 5, 15, 16, 17, 31, 32, 33, 63, 64, 65, T - 1):
            changed = idx.clone()
            changed[:, j:] = torch.randint(0, VOCAB - 8, (2, T - j), generator=g)
            out = model(changed)[0]
            torch.testing.assert_close(out[:, :j], base[:, :j], rtol=0, atol=1e-5,
                                       msg=f"{name}: position < {j} saw the future")
            assert not torch.allclose(out[:, j:], base[:, j:]), "the perturbation must change something"


@pytest.mark.parametrize("name", list(MODELS))
def test_greedy_generation_cached_equals_uncached(name):
    model = tiny(name)
    prompt = torch.randint(0, VOCAB - 8, (2, 5), generator=torch.Generator().manual_seed(2))
    n_new = model.config.block_size + 10  # also crosses the end of the context window
    cached = model.generate(prompt, n_new, top_k=1, use_cache=True)
    uncached = model.generate(prompt, n_new, top_k=1, use_cache=False)
    assert cached.shape == (2, 5 + n_new)
    assert torch.equal(cached, uncached)


@pytest.mark.parametrize("name", list(MODELS))
def test_unknown_override_is_a_clear_error(name):
    with pytest.raises(ModelConfigError, match="unknown option"):
        create_model(name, preset="tiny", n_lyer=3)


def test_unknown_model_and_preset():
    with pytest.raises(ModelConfigError, match="unknown model"):
        create_model("gpt5")
    with pytest.raises(ModelConfigError, match="unknown preset"):
        create_model("baseline_gpt2", preset="huge")
