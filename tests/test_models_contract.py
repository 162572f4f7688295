"""The contract of DESIGN.md, checked for every registered model at its tiny preset. The lists of models come
from the registry and from what each model can do (a KV cache, key masks, a backward direction, an attention
option), never from their names: a model added to models/__init__.py is tested without editing this file."""

import dataclasses
import inspect
import sys

import pytest
import torch

import models
from components import HEAD_KINDS, POS_KINDS
from models import MODELS, ModelConfigError, create_model, model_module

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


OPTIONS = [(pos, head) for pos in POS_KINDS for head in HEAD_KINDS]


def has_backward_direction(model):
    """dual_mask_gpt's forward(idx, direction="bw") reads the sequence right to left."""
    return "direction" in inspect.signature(model.forward).parameters


def takes_key_mask(name):
    """Whether a model accepts key (filler) masks; conv_attention refuses them with a ValueError."""
    idx = torch.zeros(1, 4, dtype=torch.long)
    try:
        tiny(name)(idx, key_mask=torch.ones_like(idx, dtype=torch.bool))
    except ValueError:
        return False
    return True


KEY_MASK_MODELS = [n for n in MODELS if takes_key_mask(n)]
ATTENTION_OPTION_MODELS = [n for n in MODELS
                           if "attention" in {f.name for f in dataclasses.fields(model_module(n).Config)}]


def assert_leak_free(model, **kw):
    """Changing tokens at positions >= j leaves the logits at positions < j exactly as they were
    (dual_mask_gpt bw: changing positions < j leaves positions >= j as they were). kw go to every forward."""
    name = model.name
    T = min(100, model.config.block_size)
    g = torch.Generator().manual_seed(1)
    idx = torch.randint(0, VOCAB - 8, (2, T), generator=g)
    cuts = (1, 2, 3, 4, 5, 15, 16, 17, 31, 32, 33, 63, 64, 65, T - 1)
    with torch.no_grad():
        base = model(idx, **kw)[0]
        for j in cuts:
            changed = idx.clone()
            changed[:, j:] = torch.randint(0, VOCAB - 8, (2, T - j), generator=g)
            out = model(changed, **kw)[0]
            torch.testing.assert_close(out[:, :j], base[:, :j], rtol=0, atol=1e-5,
                                       msg=f"{name}: position < {j} saw the future")
            assert not torch.allclose(out[:, j:], base[:, j:]), "the perturbation must change something"
        if not has_backward_direction(model):
            return
        base = model(idx, direction="bw", **kw)[0]
        for j in cuts:
            changed = idx.clone()
            changed[:, :j] = torch.randint(0, VOCAB - 8, (2, j), generator=g)
            out = model(changed, direction="bw", **kw)[0]
            torch.testing.assert_close(out[:, j:], base[:, j:], rtol=0, atol=1e-5,
                                       msg=f"{name} bw: position >= {j} saw the past")
            assert not torch.allclose(out[:, :j], base[:, :j]), "the perturbation must change something"


@pytest.mark.parametrize("pos,head", OPTIONS)
@pytest.mark.parametrize("name", list(MODELS))
def test_forward_is_leak_free(name, pos, head):
    assert_leak_free(tiny(name, pos=pos, head=head))


@pytest.mark.parametrize("stage", [2, 3])
@pytest.mark.parametrize("pos,head", [("alibi", "clap"), ("sinusoidal", "tied"), ("none", "clap"), ("rope", "tied")])
def test_progressive_later_stages_are_leak_free_with_every_option(stage, pos, head):
    model = tiny("progressive_diverging", pos=pos, head=head)
    model.set_stage(stage)
    assert_leak_free(model)


@pytest.mark.parametrize("pos", ["learned", "alibi", "rope"])
@pytest.mark.parametrize("name", KEY_MASK_MODELS)
def test_leak_free_with_a_filler_key_mask(name, pos):
    model = tiny(name, pos=pos)
    key_mask = torch.rand(2, min(100, model.config.block_size), generator=torch.Generator().manual_seed(2)) > 0.2
    assert_leak_free(model, key_mask=key_mask)


@pytest.mark.parametrize("name", list(MODELS))
def test_greedy_generation_cached_equals_uncached(name):
    model = tiny(name)
    prompt = torch.randint(0, VOCAB - 8, (2, 5), generator=torch.Generator().manual_seed(2))
    n_new = model.config.block_size + 10  # also crosses the end of the context window
    cached = model.generate(prompt, n_new, top_k=1, use_cache=True)
    uncached = model.generate(prompt, n_new, top_k=1, use_cache=False)
    assert cached.shape == (2, 5 + n_new)
    assert torch.equal(cached, uncached)


CACHED_MODELS = [n for n in MODELS if model_module(n).Model.supports_kv_cache]


@pytest.mark.parametrize("pos,head", [("alibi", "tied"), ("alibi", "clap"), ("sinusoidal", "clap"), ("none", "tied"),
                                      ("rope", "clap")])
@pytest.mark.parametrize("name", CACHED_MODELS)
def test_greedy_generation_cached_equals_uncached_for_every_option(name, pos, head):
    """The KV-cache path applies the same ALiBi biases / positions / head as the full forward."""
    model = tiny(name, pos=pos, head=head, block_size=24)
    prompt = torch.randint(0, VOCAB - 8, (2, 5), generator=torch.Generator().manual_seed(2))
    n_new = 24 + 6  # crosses the end of the context window (the cache is refilled)
    cached = model.generate(prompt, n_new, top_k=1, use_cache=True)
    assert torch.equal(cached, model.generate(prompt, n_new, top_k=1, use_cache=False))
    full = model(cached[:, :24])[0]
    cache = model.new_cache(2, "cpu", torch.float32)
    steps = [model.forward_cached(cached[:, :10], cache)] + [model.forward_cached(cached[:, t:t + 1], cache)
                                                             for t in range(10, 24)]
    torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", list(MODELS))
def test_unknown_override_is_a_clear_error(name):
    with pytest.raises(ModelConfigError, match="unknown option"):
        create_model(name, preset="tiny", n_lyer=3)


@pytest.mark.parametrize("name", list(MODELS))
def test_unknown_pos_or_head_is_a_clear_error(name):
    with pytest.raises(ModelConfigError, match="pos 'xpos' unknown"):
        create_model(name, preset="tiny", pos="xpos")
    with pytest.raises(ModelConfigError, match="head 'mlp' unknown"):
        create_model(name, preset="tiny", head="mlp")


def test_unknown_model_and_preset():
    with pytest.raises(ModelConfigError, match="unknown model"):
        create_model("gpt5")
    with pytest.raises(ModelConfigError, match="unknown preset"):
        create_model("baseline_gpt2", preset="huge")


# ---- key (filler) masks, features(), bidirectional attention -------------------------------------------

def forward(model, idx, **kw):
    """Logits for every direction the model has: {"fw": (B, T, V)[, "bw": ...]}."""
    if has_backward_direction(model):
        return {d: model(idx, direction=d, **kw)[0] for d in ("fw", "bw")}
    return {"fw": model(idx, **kw)[0]}


KEY_MASK_CASES = [(n, {}) for n in KEY_MASK_MODELS] + [
    ("baseline_gpt2", {"attention": "bidirectional"}), ("baseline_gpt2", {"pos": "alibi"}),
    ("baseline_gpt2", {"pos": "alibi", "attention": "bidirectional"}), ("dual_mask_gpt", {"pos": "alibi"}),
    ("progressive_diverging", {"attention": "bidirectional"})]


@pytest.mark.parametrize("name,options", KEY_MASK_CASES)
def test_masked_tokens_reach_no_other_position(name, options):
    """Changing a token whose key_mask is False changes no other position's logits (it still sees itself)."""
    model = tiny(name, **options)
    g = torch.Generator().manual_seed(3)
    idx = torch.randint(0, VOCAB - 8, (2, 24), generator=g)
    key_mask = torch.ones_like(idx, dtype=torch.bool)
    filler = [0, 5, 6, 23]                       # both ends and a run in the middle
    key_mask[:, filler] = False
    changed = idx.clone()
    changed[:, filler] = torch.randint(0, VOCAB - 8, (2, len(filler)), generator=g)
    others = [i for i in range(24) if i not in filler]
    with torch.no_grad():
        base, out = forward(model, idx, key_mask=key_mask), forward(model, changed, key_mask=key_mask)
        unmasked = forward(model, changed)
    for d in base:
        assert torch.isfinite(base[d]).all()
        torch.testing.assert_close(out[d][:, others], base[d][:, others], rtol=0, atol=1e-5)
        assert not torch.allclose(unmasked[d][:, others], base[d][:, others]), "without the mask it must leak"


def test_conv_attention_refuses_key_masks():
    model = tiny("conv_attention")
    idx = torch.randint(0, VOCAB - 8, (1, 8))
    with pytest.raises(ValueError, match="does not support filler/key masks"):
        model(idx, key_mask=torch.ones_like(idx, dtype=torch.bool))


def test_all_true_key_mask_changes_nothing():
    model = tiny("baseline_gpt2")
    idx = torch.randint(0, VOCAB - 8, (2, 16))
    with torch.no_grad():
        torch.testing.assert_close(model(idx, key_mask=torch.ones_like(idx, dtype=torch.bool))[0], model(idx)[0])


@pytest.mark.parametrize("name", list(MODELS))
def test_features_are_the_hidden_states_before_the_head(name):
    model = tiny(name)
    idx = torch.randint(0, VOCAB - 8, (2, 11))
    kw_list = [{"direction": "fw"}, {"direction": "bw"}] if has_backward_direction(model) else [{}]
    with torch.no_grad():
        for kw in kw_list:
            h = model.features(idx, **kw)
            assert h.shape == (2, 11, model.config.n_embd)
            torch.testing.assert_close(h @ model.wte.weight.t(), model(idx, **kw)[0])


@pytest.mark.parametrize("name", ATTENTION_OPTION_MODELS)
def test_bidirectional_attention_sees_the_next_token(name):
    model = tiny(name, attention="bidirectional")
    assert not model.supports_kv_cache and tiny(name).supports_kv_cache
    idx = torch.randint(0, VOCAB - 8, (2, 12))
    with torch.no_grad():
        base = model(idx)[0]
        for i in (0, 5, 10):
            changed = idx.clone()
            changed[:, i + 1] = (idx[:, i + 1] + 1) % (VOCAB - 8)
            assert not torch.allclose(model(changed)[0][:, i], base[:, i]), f"position {i} ignored token {i + 1}"
    with pytest.raises(ModelConfigError, match="cannot generate"):
        model.generate(idx, 3)
    with pytest.raises(ModelConfigError, match="attention"):
        create_model(name, preset="tiny", attention="sideways")


# ---- the registry names the models -----------------------------------------------------------------

NEW_MODEL = '''
from models.baseline_gpt2 import PRESETS, Config, Model as Baseline


class Model(Baseline):
    """A new model built on baseline_gpt2's; its author wrote no `name = ...`."""
'''


def register(monkeypatch, tmp_path, name, source):
    """Register a model file written here as models.MODELS[name], for this test only."""
    module = f"lmsmall_test_{name}"
    (tmp_path / f"{module}.py").write_text(source)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setitem(MODELS, name, module)
    monkeypatch.delitem(sys.modules, module, raising=False)


def test_a_new_model_is_named_by_its_registry_key(monkeypatch, tmp_path):
    """Before, the name came from a line in the model file: this model inherited 'baseline_gpt2', and
    convert_hf.py would have exported it as GPT-2."""
    from convert_hf import why_not_exportable
    register(monkeypatch, tmp_path, "new_gpt", NEW_MODEL)
    model = tiny("new_gpt")
    assert model.name == "new_gpt" and create_model("baseline_gpt2").name == "baseline_gpt2"
    assert why_not_exportable(model) == "new_gpt is not a GPT-2 architecture"
    assert_leak_free(model)                                  # the contract's checks take it as any model
    assert "new_gpt" in models.MODELS and takes_key_mask("new_gpt")


@pytest.mark.parametrize("source", [NEW_MODEL + '    name = "baseline_gpt2"\n',            # a copied line
                                    "from models.baseline_gpt2 import PRESETS, Config, Model\n"])  # the same class
def test_a_model_named_otherwise_than_its_registry_key_is_refused(monkeypatch, tmp_path, source):
    register(monkeypatch, tmp_path, "new_gpt", source)
    model_module("baseline_gpt2")
    with pytest.raises(ModelConfigError, match="'baseline_gpt2', but models/__init__.py registers it as 'new_gpt'"):
        create_model("new_gpt")
    assert create_model("baseline_gpt2").name == "baseline_gpt2"
