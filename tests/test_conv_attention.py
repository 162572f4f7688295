"""conv_attention: the hourglass wiring is leak-free, the seed's wiring is not, any length works, it trains."""

import json
import math

import pytest
import torch
import torch.nn as nn

from components import Block
from models import ModelConfigError, create_model
from models.conv_attention import Shorten

VOCAB = 64
# Around the group edges of every level (4, 16, 64 tokens) and the ends.
JS = (1, 2, 3, 4, 5, 7, 8, 15, 16, 17, 31, 32, 33, 63, 64, 65, 80, 99, 100, 127)


def tiny(**overrides):
    torch.manual_seed(0)
    return create_model("conv_attention", preset="tiny", vocab_size=VOCAB, **overrides).eval()


@torch.no_grad()
def leaks(model, T, js=JS, seed=1):
    """The j in js for which changing tokens at positions >= j changed a logit at a position < j."""
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, VOCAB, (2, T), generator=g)
    base = model(idx)[0]
    found = []
    for j in (j for j in js if j < T):
        changed = idx.clone()
        changed[:, j:] = torch.randint(0, VOCAB, (2, T - j), generator=g)
        out = model(changed)[0]
        assert not torch.allclose(out[:, j:], base[:, j:]), "the perturbation must change something"
        if not torch.allclose(out[:, :j], base[:, :j], rtol=0, atol=1e-5):
            found.append(j)
    return found


@pytest.mark.parametrize("T", [128, 100])
@pytest.mark.parametrize("overrides", [{}, {"target_offset": 64}, {"n_full_blocks": 0, "n_level_blocks": 1}],
                         ids=["default", "target_offset_64", "no_full_res_blocks"])
def test_leak_free(T, overrides):
    # Without full-resolution blocks every position's only view of its past is through the compressed levels.
    assert leaks(tiny(**overrides), T) == []


def test_rtx3080_preset_shape():
    model = create_model("conv_attention", preset="rtx3080")
    c = model.config
    assert (c.n_embd, c.n_head, c.block_size, c.n_levels, c.shorten_factor) == (48, 6, 1024, 3, 4)
    assert model.n_blocks == 12  # the seed's 1 + 2 + 2 + 2 + 2 + 2 + 1
    widths = [blocks[0].ln_1.normalized_shape[0] for blocks in model.down_blocks] + \
             [model.middle_blocks[0].ln_1.normalized_shape[0]]
    assert widths == [48, 96, 192, 384] and all(w % 6 == 0 for w in widths)
    assert [len(b) for b in model.down_blocks] == [1, 2, 2] and len(model.middle_blocks) == 2
    assert [len(b) for b in model.up_blocks] == [1, 2, 2]


def test_shapes_through_the_levels():
    model = tiny()
    seen = []
    hooks = [m.register_forward_hook(lambda m, i, o: seen.append(tuple(o.shape))) for m in model.shorten]
    model(torch.zeros(1, 100, dtype=torch.long))  # padded to 128
    for h in hooks:
        h.remove()
    C = model.config.n_embd
    assert seen == [(1, 32, 2 * C), (1, 8, 4 * C), (1, 2, 8 * C)]


def test_the_shift_is_what_makes_it_causal():
    """Remove the shift before shortening: compressed token g then summarises 4g .. 4g+3 and is
    upsampled to positions 4g .. 4g+3, so positions read tokens after them."""
    model = tiny()
    for m in model.modules():
        if isinstance(m, Shorten):
            m.shift = 0
    found = leaks(model, 128)
    assert set(found) >= {1, 2, 3, 4, 5, 15, 17, 63, 65}, found


class SeedWiring(nn.Module):
    """The seed's wiring in small: block, compressor (Conv1d over the sequence, stride 4, width x2), block,
    and its expander, a Conv1d whose *channels are the sequence positions* (T/4 -> T, sliding over the
    embedding dimension). Every output position mixes every compressed position, the future included."""

    def __init__(self, T=128, C=32, n_head=4):
        super().__init__()
        self.wte, self.wpe = nn.Embedding(VOCAB, C), nn.Embedding(T, C)
        self.block_in, self.block_mid, self.block_out = Block(C, n_head), Block(2 * C, n_head), Block(C, n_head)
        self.compress_ln = nn.LayerNorm(C)
        self.compress_conv = nn.Conv1d(C, 2 * C, kernel_size=4, stride=4)
        self.expand_ln = nn.LayerNorm(2 * C)
        self.expand_conv = nn.Conv1d(T // 4, T, kernel_size=2, stride=2)  # channels = positions
        self.ln_f = nn.LayerNorm(C)

    def forward(self, idx):
        T = idx.size(1)  # the seed needed exactly T tokens (it padded prompts with spaces)
        x = self.block_in(self.wte(idx) + self.wpe(torch.arange(T)))
        x = self.compress_conv(self.compress_ln(x).transpose(1, 2)).transpose(1, 2)    # (B, T/4, 2C)
        x = self.expand_conv(self.expand_ln(self.block_mid(x)))                       # (B, T, C)
        x = self.ln_f(self.block_out(x))
        return x @ self.wte.weight.t(), None


def test_seed_wiring_leaks():
    """The same check fails for the seed's wiring at every j: its 1.3 test loss was future-token copying."""
    torch.manual_seed(0)
    model = SeedWiring().eval()
    js = [j for j in JS if j < 128]
    assert leaks(model, 128, js) == js


def test_any_length_and_prefix_consistency():
    """Internal right padding is harmless: the logits of a prefix are those of the longer sequence."""
    model = tiny()
    idx = torch.randint(0, VOCAB, (2, model.config.block_size), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        full = model(idx)[0]
        for T in (1, 3, 63, 64, 65, 100, 129, model.config.block_size):
            logits, loss = model(idx[:, :T], idx[:, :T])
            assert logits.shape == (2, T, VOCAB) and torch.isfinite(loss)
            torch.testing.assert_close(logits, full[:, :T], rtol=0, atol=1e-5)
    with pytest.raises(AssertionError, match="block_size"):
        model(torch.zeros(1, model.config.block_size + 1, dtype=torch.long))


@pytest.mark.parametrize("prompt_len", [1, 63, 65, 300])
def test_generate_from_any_prompt_length(prompt_len):
    model = tiny()
    prompt = torch.randint(0, VOCAB, (2, prompt_len), generator=torch.Generator().manual_seed(prompt_len))
    out = model.generate(prompt, 8, top_k=1)
    assert out.shape == (2, prompt_len + 8) and torch.equal(out[:, :prompt_len], prompt)
    # Greedy: each new token is the argmax of a plain forward over the context before it: the last block_size
    # tokens, and once that overflows the last block_size // 2 (generate()'s sliding window)
    W, start = model.config.block_size, max(0, prompt_len - model.config.block_size)
    for t in range(prompt_len, prompt_len + 8):
        start = t - W // 2 if t - start > W else start
        assert torch.equal(model(out[:, start:t])[0][:, -1].argmax(-1), out[:, t])
    sampled = model.generate(prompt, 8, temperature=1.0, top_k=5, generator=torch.Generator().manual_seed(0))
    assert sampled.shape == (2, prompt_len + 8) and int(sampled.max()) < VOCAB


def test_generate_refuses_a_64_ahead_model():
    with pytest.raises(ModelConfigError, match="target_offset"):
        tiny(target_offset=64).generate(torch.zeros(1, 3, dtype=torch.long), 2)


def test_every_parameter_gets_a_gradient():
    model = tiny().train()
    idx = torch.randint(0, VOCAB, (2, 100))
    model(idx, idx)[1].backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert missing == []  # also what DDP needs: no unused parameters


def test_initial_loss_is_uniform_guess():
    model = tiny()
    idx, targets = torch.randint(0, VOCAB, (2, 4, 256))
    assert abs(model(idx, targets)[1].item() - math.log(VOCAB)) < 0.2


@pytest.mark.parametrize("overrides, match", [
    (dict(n_embd=48, n_head=5), "n_head"),
    (dict(shorten_factor=1), "shorten_factor"),
    (dict(n_levels=0), "n_levels"),
    (dict(target_offset=0), "target_offset"),
    (dict(n_level_blocks=-1), "n_level_blocks"),
])
def test_impossible_sizes_are_clear_errors(overrides, match):
    with pytest.raises(ModelConfigError, match=match):
        create_model("conv_attention", preset="tiny", **overrides)


# ---- through the trainer -------------------------------------------------------------------

# One thread per training process: on a shared 2-core box, 2 OpenMP threads per process against other
# busy processes can make a step 10x slower; the results do not depend on it (every run here uses 1).
ONE_THREAD = {"OMP_NUM_THREADS": "1"}


def read_rows(run_dir):
    with open(run_dir / "metrics.jsonl") as f:
        return [json.loads(line) for line in f]


def test_tiny_training_loss_falls(data_dir, tmp_path):
    from conftest import run_script, train_args
    out = tmp_path / "run"
    r = run_script("train_conv_attention.py", *train_args(data_dir, out, "--max-steps", 25, "--eval-interval", 25,
                                                          "--seq-len", 128, "--total-batch-size", 1024,
                                                          "--eval-batches", 2), env=ONE_THREAD)
    assert r.returncode == 0, r.stderr[-2000:]
    rows = read_rows(out)
    val = [row["loss"] for row in rows if row["split"] == "val"]
    train = [row["loss"] for row in rows if row["split"] == "train"]
    assert len(val) == 2 and val[-1] < val[0] - 1.0, val  # from ~ln(320) = 5.8 to well below
    assert sum(train[-5:]) / 5 < sum(train[:5]) / 5 - 1.0
    assert any(row["split"] == "test" for row in rows)
    config = json.load(open(out / "config.json"))
    assert config["micro_batch_size"] == 4 and config["model_config"]["n_embd"] == 32  # this model's tiny preset


def test_tiny_kill_and_resume_matches_uninterrupted(data_dir, tmp_path):
    from conftest import run_script, train_args
    common = ("--max-steps", 4, "--eval-interval", 2, "--checkpoint-interval", 2, "--seq-len", 64,
              "--total-batch-size", 512, "--eval-batches", 2)
    whole, broken = tmp_path / "whole", tmp_path / "broken"
    r = run_script("train_conv_attention.py", *train_args(data_dir, whole, *common), env=ONE_THREAD)
    assert r.returncode == 0, r.stderr[-2000:]
    r = run_script("tests/fault_run.py", "kill_after_step:3", "train_conv_attention.py",
                   *train_args(data_dir, broken, *common), env=ONE_THREAD)
    assert r.returncode != 0  # killed like kill -9 after step 3; the last checkpoint is at step 2
    r = run_script("train_conv_attention.py", *train_args(data_dir, broken, *common, "--resume"), env=ONE_THREAD)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "resuming at step 2" in r.stdout
    key = lambda rows: [(row["step"], row["split"], row["loss"]) for row in rows]
    assert key(read_rows(broken)) == key(read_rows(whole))
