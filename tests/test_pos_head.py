"""ALiBi (causal, anti-causal, bidirectional symmetric and shifted), sinusoidal positions, the CLAP
head; the options in checkpoints and --resume; bench/pos_head.py --smoke.
(The leak and cached-generation tests over every model x pos x head are in test_models_contract.py.)"""

import json
import math

import pytest
import torch
import torch.nn.functional as F

from checkpoint import load_model
from components import OutputHead, SelfAttention, alibi_bias, alibi_slopes, attention_bias, sinusoidal_table
from conftest import run_script, train_args
from models import MODELS, create_model

INF = float("-inf")
V = 64

# The matrices of components.py's docstring (one head, slope 1), written out by hand.
CAUSAL = [[0, INF, INF, INF, INF],
          [-1, 0, INF, INF, INF],
          [-2, -1, 0, INF, INF],
          [-3, -2, -1, 0, INF],
          [-4, -3, -2, -1, 0]]
ANTICAUSAL = [[0, -1, -2, -3, -4],
              [INF, 0, -1, -2, -3],
              [INF, INF, 0, -1, -2],
              [INF, INF, INF, 0, -1],
              [INF, INF, INF, INF, 0]]
SYMMETRIC = [[0, -1, -2, -3, -4],
             [-1, 0, -1, -2, -3],
             [-2, -1, 0, -1, -2],
             [-3, -2, -1, 0, -1],
             [-4, -3, -2, -1, 0]]
SHIFTED = [[0, -.5, -1.5, -2.5, -3.5],   # the seed's matrix, verbatim
           [-1, 0, -.5, -1.5, -2.5],
           [-2, -1, 0, -.5, -1.5],
           [-3, -2, -1, 0, -.5],
           [-4, -3, -2, -1, 0]]


@pytest.mark.parametrize("kind,shifted,want", [("causal", False, CAUSAL), ("anticausal", False, ANTICAUSAL),
                                               ("bidirectional", False, SYMMETRIC),
                                               ("bidirectional", True, SHIFTED)])
def test_alibi_bias_equals_the_hand_written_matrix(kind, shifted, want):
    bias = alibi_bias(kind, 5, 5, 2, shifted=shifted)          # 2 heads: slopes 1/16 and 1/256
    assert bias.shape == (2, 5, 5)
    for h, slope in enumerate((2 ** -4, 2 ** -8)):
        assert torch.equal(bias[h], slope * torch.tensor(want))
    # With a KV cache the queries are rows q_start.. of the same matrix.
    assert torch.equal(alibi_bias(kind, 2, 5, 2, q_start=3, shifted=shifted), bias[:, 3:5])


def test_causal_alibi_variant_does_not_matter_and_the_bias_is_cached():
    assert torch.equal(alibi_bias("causal", 6, 6, 4, shifted=True), alibi_bias("causal", 6, 6, 4, shifted=False))
    assert alibi_bias("causal", 7, 7, 4) is alibi_bias("causal", 7, 7, 4)  # built once per length


def test_alibi_slopes_follow_press_et_al():
    assert alibi_slopes(8) == [2 ** -i for i in range(1, 9)]
    assert alibi_slopes(4) == [2 ** -2, 2 ** -4, 2 ** -6, 2 ** -8]
    # not a power of two: the 4-head slopes, then every other slope of the 8-head sequence
    assert alibi_slopes(6) == [2 ** -2, 2 ** -4, 2 ** -6, 2 ** -8, 2 ** -1, 2 ** -3]


@pytest.mark.parametrize("mask,variant", [("causal", "symmetric"), ("anticausal", "symmetric"),
                                          ("bidirectional", "symmetric"), ("bidirectional", "shifted")])
def test_attention_adds_the_bias_to_the_scores(mask, variant):
    """SelfAttention with ALiBi == softmax(q k^T / sqrt(D) + bias) v, written out; key masks on top."""
    torch.manual_seed(0)
    attn = SelfAttention(16, 4, alibi=variant).eval()
    x = torch.randn(2, 6, 16)
    key_mask = torch.tensor([[True] * 6, [True, False, True, True, False, True]])
    q, k, v = (t.view(2, 6, 4, 4).transpose(1, 2) for t in attn.c_attn(x).split(16, dim=2))
    bias = alibi_bias(mask, 6, 6, 4, shifted=variant == "shifted")
    keep = key_mask[:, None, None, :] | torch.eye(6, dtype=torch.bool)
    scores = (q @ k.transpose(-1, -2) / 2 + bias).masked_fill(~keep, INF)
    want = attn.c_proj((scores.softmax(-1) @ v).transpose(1, 2).reshape(2, 6, 16))
    torch.testing.assert_close(attn(x, mask, key_mask=key_mask), want, rtol=1e-5, atol=1e-5)
    mask_only = attention_bias(mask, 6, 6, "cpu", key_mask=key_mask)       # without ALiBi: a bool mask
    assert mask_only.dtype == torch.bool and mask_only.shape[-2:] == (6, 6)


def test_shifted_and_symmetric_alibi_differ_in_a_bidirectional_model():
    torch.manual_seed(0)
    a = create_model("baseline_gpt2", vocab_size=V, n_layer=1, pos="alibi", attention="bidirectional").eval()
    b = create_model("baseline_gpt2", vocab_size=V, n_layer=1, pos="alibi", attention="bidirectional",
                     alibi_bidirectional="symmetric").eval()
    b.load_state_dict(a.state_dict())
    idx = torch.randint(0, V, (1, 9))
    with torch.no_grad():
        assert not torch.allclose(a(idx)[0], b(idx)[0])


def test_sinusoidal_table():
    pos = torch.arange(7)
    table = sinusoidal_table(pos, 6)
    for p in range(7):
        for i in range(3):
            angle = p / 10000 ** (i / 3)
            assert math.isclose(table[p, i].item(), math.sin(angle), abs_tol=1e-6)
            assert math.isclose(table[p, 3 + i].item(), math.cos(angle), abs_tol=1e-6)
    assert sinusoidal_table(pos, 7)[:, 6].abs().sum() == 0  # odd width: one zero channel


@pytest.mark.parametrize("name", list(MODELS))
def test_clap_cosine_logits_are_bounded_by_beta(name):
    torch.manual_seed(0)
    model = create_model(name, vocab_size=V, head="clap-cosine").eval()
    head = model.head
    assert [n for n, _ in head.named_parameters()] == ["log_beta"]   # no layer, no bias
    with torch.no_grad():
        head.log_beta.fill_(math.log(3.0))
        model.wte.weight.mul_(50)                                     # large weights do not matter
        logits = model(torch.randint(0, V - 8, (2, 20)))[0]
    assert logits.abs().max() <= 3.0 + 1e-4
    assert logits.abs().max() > 1.0                                   # the bound is not vacuous
    e = head.embed(model.wte, torch.arange(5)[None])
    torch.testing.assert_close(e.norm(dim=-1), torch.ones(1, 5))      # unit-length token embeddings go in


def test_clap_is_the_seeds_formula_on_a_hand_computed_example():
    """Seed 002's ClapHead (fairseq): logits = beta * h @ normalize(E)^T, h NOT normalised, beta a learned
    scalar starting at 1; embeddings L2-normalised on the way in."""
    head = OutputHead("clap")
    assert [n for n, _ in head.named_parameters()] == ["beta"] and head.beta.item() == 1.0
    E = torch.tensor([[3.0, 4.0], [0.0, 2.0], [1.0, 0.0]])          # unit rows: (.6, .8), (0, 1), (1, 0)
    h = torch.tensor([[[2.0, 1.0], [-1.0, 10.0]]])                   # (1, 2, 2), not unit length
    want = torch.tensor([[[2.0, 1.0, 2.0],                           # 2*.6 + 1*.8, 1, 2
                          [7.4, 10.0, -1.0]]])                       # -.6 + 8, 10, -1
    torch.testing.assert_close(head(h, E), want)
    with torch.no_grad():
        head.beta.fill_(0.5)
    torch.testing.assert_close(head(h, E), 0.5 * want)
    wte = torch.nn.Embedding(3, 2)
    with torch.no_grad():
        wte.weight.copy_(E)
    torch.testing.assert_close(head.embed(wte, torch.tensor([[0, 1]])), torch.tensor([[[0.6, 0.8], [0.0, 1.0]]]))
    logits = head(h.requires_grad_(), wte.weight)
    F.cross_entropy(logits[0], torch.tensor([1, 2])).backward()
    assert wte.weight.grad.abs().sum() > 0 and head.beta.grad.abs() > 0   # tied, and beta learns


def test_clap_cosine_head_is_tied_and_beta_learns():
    wte = torch.nn.Embedding(10, 8)
    head = OutputHead("clap-cosine")
    h = torch.randn(3, 8, requires_grad=True)
    logits = head(h, wte.weight)
    want = head.log_beta.exp() * F.normalize(h, dim=-1) @ F.normalize(wte.weight, dim=-1).t()
    torch.testing.assert_close(logits, want)
    F.cross_entropy(logits, torch.tensor([1, 2, 3])).backward()
    assert wte.weight.grad.abs().sum() > 0 and head.log_beta.grad.abs() > 0
    assert math.isclose(head.log_beta.exp().item(), 1 / 0.07, rel_tol=1e-6)  # CLIP's starting logit scale


@pytest.mark.parametrize("pos", ["alibi", "sinusoidal", "none"])
def test_positions_without_a_table_extrapolate_and_learned_ones_do_not(pos):
    model = create_model("baseline_gpt2", vocab_size=V, n_layer=2, block_size=16, pos=pos).eval()
    idx = torch.randint(0, V, (1, 64))
    with torch.no_grad():
        long = model(idx)[0]
        assert long.shape == (1, 64, V) and torch.isfinite(long).all()
        torch.testing.assert_close(long[:, :16], model(idx[:, :16])[0])   # causal: a prefix is a prefix
    learned = create_model("baseline_gpt2", vocab_size=V, n_layer=2, block_size=16)
    with pytest.raises(AssertionError, match="block_size"):
        learned(idx)


def test_alibi_model_has_no_position_weights():
    plain = create_model("baseline_gpt2", vocab_size=V)
    alibi = create_model("baseline_gpt2", vocab_size=V, pos="alibi")
    assert "wpe.weight" in plain.state_dict() and "wpe.weight" not in alibi.state_dict()
    assert plain.num_params() - alibi.num_params() == plain.config.block_size * plain.config.n_embd
    for head in ("clap", "clap-cosine"):
        clap = create_model("baseline_gpt2", vocab_size=V, head=head)
        assert clap.num_params() - plain.num_params() == 1   # beta


SMALL = ("--n-layer", 2, "--n-head", 2, "--n-embd", 32, "--micro-batch-size", 4, "--seq-len", 32,
         "--total-batch-size", 128, "--eval-interval", 4, "--checkpoint-interval", 4)


def rows(run_dir, split):
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [(r["step"], r["loss"]) for r in map(json.loads, lines) if r["split"] == split]


def test_options_are_flags_saved_in_the_checkpoint_and_restored_on_resume(data_dir, tmp_path):
    from base_trainer import build_parser
    for name in MODELS:
        assert "--pos" in build_parser(name).format_help() and "--head" in build_parser(name).format_help()
    out = tmp_path / "run"
    result = run_script("train_baseline_gpt2.py", *train_args(data_dir, out, *SMALL, "--max-steps", 4,
                                                               "--pos", "alibi", "--head", "clap"))
    assert result.returncode == 0, result.stderr
    model, ckpt = load_model(str(out / "checkpoint.pt"))
    assert (model.config.pos, model.config.head) == ("alibi", "clap") and ckpt["model_config"]["pos"] == "alibi"
    assert all(b.attn.alibi for b in model.blocks) and "wpe.weight" not in ckpt["model_state"]
    assert model.head.beta.item() != 1.0                              # beta trained, saved and restored
    # Resumed without the flags: the model is rebuilt from the checkpoint's options (a learned/tied model
    # could not load these weights) and training continues.
    resumed = run_script("train_baseline_gpt2.py", *train_args(data_dir, out, *SMALL, "--max-steps", 6, "--resume"))
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming at step 4" in resumed.stdout
    assert json.loads((out / "config.json").read_text())["model_config"]["head"] == "clap"
    assert [s for s, _ in rows(out, "train")] == list(range(6))
    model, _ = load_model(str(out / "checkpoint.pt"))
    assert (model.config.pos, model.config.head) == ("alibi", "clap")


def test_bench_smoke(data_dir, tmp_path):
    from conftest import TINY_TOKENS
    result = run_script("bench/pos_head.py", "--smoke", "--data-dir", data_dir, "--max-tokens", TINY_TOKENS,
                        "--out-dir", tmp_path / "bench", timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    out = result.stdout
    for variant in ("| baseline |", "| +alibi |", "| +clap |", "| +alibi+clap |", "| +clap-cosine |"):
        assert out.count(variant) == 2, out                            # one row in each table
    learned_row = [line for line in out.splitlines() if line.startswith("| baseline |")][-1]
    assert learned_row.count("n/a") == 2                               # learned: no 2x, 4x
    alibi_row = [line for line in out.splitlines() if line.startswith("| +alibi |")][-1]
    assert "n/a" not in alibi_row and alibi_row.count("±") == 3
    saved = json.loads((tmp_path / "bench" / "results.json").read_text())
    assert len(saved["results"]["+alibi"]) == 2                        # two seeds
