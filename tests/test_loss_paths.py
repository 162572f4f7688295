"""The two loss paths agree, for every registered model.

    plain:    masked_cross_entropy(model(idx)[0], targets, loss_mask)   full logits; what model(idx, targets) returns
    training: model.training_loss(x, y, loss_mask, step) -> lm_loss      what the trainer calls: the chunked head,
                                                                        auto_regressive_model.chunked_cross_entropy

Same value and same gradient of every parameter (fp32), with and without a loss mask, the head cut into several
chunks. Each model is checked as built and as memory_probe_model() returns it (its most demanding training step:
dual_mask_gpt trains fw and bw, progressive_diverging is in its last stage, with LoRA).
"""

import pytest
import torch

import auto_regressive_model as arm
from auto_regressive_model import AutoRegressiveModel, masked_cross_entropy
from models import MODELS, create_model

V = 96        # vocabulary of the tiny models
ROWS = 5      # rows per chunk of the head: 2 x 16 positions -> 7 chunks, the last one short
B, T = 2, 16


@pytest.fixture(autouse=True)
def small_chunks(monkeypatch):
    monkeypatch.setattr(arm, "CHUNK_ELEMENTS", ROWS * V)   # ROWS rows of logits per chunk


def batch(with_mask, ignored=False):
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, V - 2, (B, T), generator=g)     # below dual_mask_gpt's two task tokens
    y = torch.randint(0, V - 2, (B, T), generator=g)
    if ignored:
        y[0, 3] = y[1, 0] = y[1, -1] = -1                  # targets that do not count
    mask = (torch.rand(B, T, generator=g) > 0.4).float() if with_mask else None
    return x, y, mask


def models_under_test(name):
    """[(label, model)]: the model as built and, where it differs, its memory probe."""
    torch.manual_seed(0)
    model = create_model(name, "tiny", vocab_size=V)
    probe = model.memory_probe_model()
    return [("as built", model)] + ([("memory probe", probe)] if probe is not model else [])


def count_chunks(model):
    """Make the model count the chunks its head's loss runs in (speed.compile_model swaps chunk_loss the same way)."""
    chunks = []

    def counting_chunk_loss(hc, *args):
        chunks.append(hc.size(0))
        return arm.chunk_loss_and_grads(hc, *args)
    model.chunk_loss = counting_chunk_loss
    return chunks


def grads_of(loss, model):
    params = [p for p in model.parameters() if p.requires_grad]
    return dict(zip(map(id, params), torch.autograd.grad(loss, params, allow_unused=True)))


def assert_same(label, model, loss, grads, plain, plain_grads):
    assert torch.allclose(loss, plain, atol=1e-5), (label, float(loss), float(plain))
    for name, p in model.named_parameters():
        if p.requires_grad:
            a, b = grads[id(p)], plain_grads[id(p)]
            assert (a is None) == (b is None), (label, name)
            if a is not None:
                assert torch.allclose(a, b, rtol=1e-4, atol=1e-6), (label, name, float((a - b).abs().max()))


@pytest.mark.parametrize("with_mask", [False, True])
@pytest.mark.parametrize("name", list(MODELS))
def test_training_loss_equals_the_plain_loss_in_value_and_gradient(name, with_mask):
    x, y, mask = batch(with_mask)
    for label, model in models_under_test(name):
        chunks = count_chunks(model)
        loss, metrics = model.training_loss(x, y, mask, 0)
        grads = grads_of(loss, model)
        assert len(chunks) >= 2 and max(chunks) == ROWS, (label, chunks)   # the chunked head ran, in chunks

        # The plain path: without the head's operands, lm_loss computes masked_cross_entropy(self(idx)[0], ...),
        # so a model's own training_loss (dual_mask_gpt: one loss per direction) runs on the full logits.
        chunks.clear()
        model.head_operands = lambda h: None
        plain, plain_metrics = model.training_loss(x, y, mask, 0)
        assert not chunks, label
        del model.head_operands
        assert_same(label, model, loss, grads, plain, grads_of(plain, model))
        assert metrics.keys() == plain_metrics.keys(), label
        for k in metrics:
            assert float(metrics[k]) == pytest.approx(float(plain_metrics[k]), abs=1e-5), (label, k)

        if type(model).training_loss is AutoRegressiveModel.training_loss:  # the default: one next-token loss
            reference = masked_cross_entropy(model(x)[0], y, mask)
            assert torch.allclose(loss, reference, atol=1e-5), (label, float(loss), float(reference))


@pytest.mark.parametrize("with_mask", [False, True])
@pytest.mark.parametrize("name", list(MODELS))
def test_lm_loss_with_ignored_targets_equals_the_plain_loss(name, with_mask):
    """Targets -1 count nowhere (neither in the sum nor in the number of tokens averaged over), on both paths."""
    x, y, mask = batch(with_mask, ignored=True)
    for label, model in models_under_test(name):
        chunks = count_chunks(model)
        loss = model.lm_loss(x, y, mask)
        grads = grads_of(loss, model)
        assert len(chunks) >= 2, (label, chunks)
        plain = masked_cross_entropy(model(x)[0], y, mask)
        assert_same(label, model, loss, grads, plain, grads_of(plain, model))
        assert torch.allclose(model(x, y)[1], masked_cross_entropy(model(x)[0], y), atol=1e-6), label
        if mask is not None:  # the positions that count: target != -1 and mask 1
            kept = mask * (y != -1)
            assert torch.allclose(loss, masked_cross_entropy(model(x)[0], y.clamp(min=0), kept), atol=1e-5), label
