"""Batched generation (AutoRegressiveModel.generate with prompts of different lengths, per-row stops, one KV
cache) gives, row by row, the tokens of the one-prompt-at-a-time path; and generate.py's stop rule."""

import pytest
import torch

from auto_regressive_model import left_pad
from models import MODELS, create_model, model_module

VOCAB = 64
CACHED = [n for n in MODELS if model_module(n).Model.supports_kv_cache]


def tiny(name, **overrides):
    torch.manual_seed(0)
    return create_model(name, preset="tiny", vocab_size=VOCAB, **overrides).eval()


def prompts(lengths, seed=3):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, VOCAB - 8, (n,), generator=g).tolist() for n in lengths]


def one_at_a_time(model, rows, n_new, **kw):
    """The reference: each prompt alone, no padding, the whole context recomputed for every token."""
    return [model.generate(torch.tensor([p]), n_new, top_k=1, use_cache=False, **kw)[0, len(p):].tolist()
            for p in rows]


def batched(model, rows, n_new, **kw):
    idx, key_mask = left_pad(rows)
    out = model.generate(idx, n_new, top_k=1, prompt_lengths=key_mask.sum(1), **kw)
    return [r[idx.size(1):] for r in out.tolist()]


@pytest.mark.parametrize("name", list(MODELS))
def test_batched_greedy_equals_one_at_a_time_with_mixed_prompt_lengths(name):
    model = tiny(name)
    rows = prompts([1, 9, 4, 17, 2])
    assert batched(model, rows, 12) == one_at_a_time(model, rows, 12)
    if model.supports_kv_cache:  # and the batched path without the cache (right padding)
        assert batched(model, rows, 12, use_cache=False) == one_at_a_time(model, rows, 12)


@pytest.mark.parametrize("pos,head", [("learned", "clap"), ("alibi", "tied"), ("sinusoidal", "clap-cosine"),
                                      ("none", "tied")])
@pytest.mark.parametrize("name", CACHED)
def test_batched_greedy_equals_one_at_a_time_for_every_option_across_the_window(name, pos, head):
    """Left padding must not shift positions (learned, sinusoidal), ALiBi distances or dual_mask's FW token;
    and past block_size (the cache is refilled) each row still sees its own last block_size tokens."""
    model = tiny(name, pos=pos, head=head, block_size=20)
    rows = prompts([3, 11, 6])
    n_new = 26  # the longest row crosses the window after 9 tokens, the shortest after 17
    assert batched(model, rows, n_new) == one_at_a_time(model, rows, n_new)


@pytest.mark.parametrize("name", CACHED)
def test_one_cache_for_the_whole_answer(name, monkeypatch):
    """Within the window the prompts are fed once; then one token per row and step (no rebuilds)."""
    model = tiny(name)
    fed = []
    real = model.forward_cached
    monkeypatch.setattr(model, "forward_cached", lambda idx, cache, key_mask=None: fed.append(idx.shape) or
                        real(idx, cache, key_mask))
    batched(model, prompts([5, 2, 8]), 30)
    assert fed[0] == (3, 8) and fed[1:] == [(3, 1)] * 29


@pytest.mark.parametrize("name", CACHED)
def test_the_window_slides_by_half_its_length(name, monkeypatch):
    """Past block_size a row's context restarts from its last block_size // 2 tokens: each token is the argmax
    of a plain forward over exactly that context, and the cache is refilled once per slide, not every token."""
    model = tiny(name, block_size=20)
    fed = []
    real = model.forward_cached
    monkeypatch.setattr(model, "forward_cached", lambda idx, cache, key_mask=None: fed.append(idx.size(1)) or
                        real(idx, cache, key_mask))
    prompt = torch.tensor(prompts([5])[0])[None]
    out = model.generate(prompt, 40, top_k=1)
    start, slides = 0, 0
    for t in range(5, 45):
        if t - start > 20:
            start, slides = t - 10, slides + 1
        assert model(out[:, start:t])[0][0, -1].argmax() == out[0, t], t
    assert slides == 3 and sum(n > 1 for n in fed) == 1 + slides


@pytest.mark.parametrize("name", list(MODELS))
def test_each_row_stops_at_its_own_stop(name):
    """Row 0 stops at eos, row 1 at a stop rule, row 2 runs to max_new_tokens; the stopped rows are filled
    with eos and the tokens before each stop are those of the one-at-a-time path."""
    model = tiny(name)
    rows = prompts([6, 3, 10], seed=5)
    free = one_at_a_time(model, rows, 15)
    eos = free[0][4]                      # row 0's 5th token becomes the end-of-text token
    stop_after = 7 if eos not in free[1][:7] else free[1].index(eos)

    def stop(new):                        # row 1 (recognised by its first token) stops after 7 tokens
        return new[:1] == free[1][:1] and len(new) == 7
    got = batched(model, rows, 15, eos_token=eos, stop=stop)
    cut0 = free[0].index(eos) + 1
    assert got[0] == free[0][:cut0] + [eos] * (15 - cut0)
    assert got[1][:stop_after] == free[1][:stop_after] and set(got[1][stop_after:]) <= {eos}
    if eos not in free[2]:
        assert got[2] == free[2]


def test_generation_ends_when_every_row_has_stopped():
    model = tiny("baseline_gpt2")
    idx, key_mask = left_pad(prompts([4, 7]))
    out = model.generate(idx, 50, top_k=1, prompt_lengths=key_mask.sum(1), stop=lambda new: len(new) == 3)
    assert out.shape == (2, 7 + 3)


def test_sampling_with_a_seed_is_reproducible_and_single_prompts_still_work():
    model = tiny("baseline_gpt2")
    idx = torch.tensor([prompts([5])[0]] * 3)
    a = model.generate(idx, 10, temperature=1.0, generator=torch.Generator().manual_seed(1))
    b = model.generate(idx, 10, temperature=1.0, generator=torch.Generator().manual_seed(1))
    assert torch.equal(a, b) and a.shape == (3, 15) and torch.equal(a[:, :5], idx)
    with pytest.raises(ValueError, match="1..5 tokens"):
        model.generate(idx, 3, prompt_lengths=[5, 0, 5])


@pytest.fixture(scope="module")
def bytes_run(data_dir, tmp_path_factory):
    from test_answer_loss import trainer
    out = tmp_path_factory.mktemp("gen") / "run"
    assert trainer(data_dir, out, "--max-steps", 2, "--eval-interval", 2, "--data-dir", data_dir).train() == 0
    return out / "checkpoint.pt"


def test_generate_script_stops_at_endoftext_unless_no_stop(bytes_run, monkeypatch):
    """An untrained byte model rarely writes <|endoftext|> (id 256) by itself: the test makes token 256 the
    model's only choice after 3 tokens by patching the model's sampler through the script's module."""
    import auto_regressive_model
    import generate
    real = auto_regressive_model.AutoRegressiveModel.sample
    steps = {"n": 0}

    def sample(logits, *a, **kw):
        steps["n"] += 1
        tokens = real(logits, *a, **kw)
        return torch.full_like(tokens, 256) if steps["n"] > 3 else tokens
    monkeypatch.setattr(auto_regressive_model.AutoRegressiveModel, "sample", staticmethod(sample))
    outs = []
    monkeypatch.setattr("builtins.print", lambda *a, **kw: outs.append(" ".join(map(str, a))))
    assert generate.main(["--checkpoint", str(bytes_run), "--prompt", "Question: 2 + 3?\nAnswer:",
                          "--max-new-tokens", "20", "--top-k", "1"]) == 0
    assert steps["n"] == 4 and not outs[-1].endswith("<|endoftext|>")   # stopped, the marker not printed
    steps["n"] = 0
    assert generate.main(["--checkpoint", str(bytes_run), "--prompt", "Question: 2 + 3?\nAnswer:",
                          "--max-new-tokens", "20", "--top-k", "1", "--no-stop"]) == 0
    assert steps["n"] == 20 and outs[-1].count("<|endoftext|>") == 17


def test_generate_script_bad_input_is_one_line(bytes_run, capsys):
    import generate
    try:  # argparse's one-line error exits (SystemExit 2), the script's own checks return 2
        code = generate.main(["--checkpoint", str(bytes_run), "--max-new-tokens", "-1"])
    except SystemExit as e:
        code = e.code
    assert code == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1


def test_a_prompt_that_is_not_utf8_is_refused_not_replaced(tmp_path):
    """Bytes that are not UTF-8 on the command line (Python keeps them as surrogate escapes) were turned
    into U+FFFD by the tokenizer and the sample printed as if that had been the prompt."""
    import os
    import subprocess
    import sys
    from conftest import REPO
    result = subprocess.run([sys.executable, "generate.py", "--checkpoint", os.fsencode(tmp_path / "none.pt"),
                             "--prompt", b"caf\xe9 = "], cwd=REPO, capture_output=True, text=True)
    err = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(err) == 1 and "not valid UTF-8" in err[0], result.stderr
