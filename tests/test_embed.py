"""embed.py (pooled and token embeddings of causal, MNTP and dual models, MaxSim) and bench/retrieval.py."""

import dataclasses
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import run_script

TEXTS = ["What is 2 + 3?", "Natalia sold clips to 48 of her friends in April, and then half as many in May.",
         "x", "A much longer text " * 3 + "that the context (64 tokens) cuts short at the end " * 2]
C = 32
KINDS = {"causal": ("baseline_gpt2", {}), "mntp": ("baseline_gpt2", {"attention": "bidirectional"}),
         "dual": ("dual_mask_gpt", {})}


def random_model(name, **overrides):
    from models import create_model
    torch.manual_seed(0)
    return create_model(name, preset="tiny", vocab_size=320, block_size=64, n_layer=2, n_head=2, n_embd=C,
                        **overrides).eval()


def save(model, path):
    from checkpoint import CHECKPOINT_FORMAT
    torch.save({"format": CHECKPOINT_FORMAT, "model_name": model.name, "model_config": dataclasses.asdict(model.config),
                "model_state": model.state_dict(), "model_extra_state": model.extra_state(),
                "config": {"tokenizer": "bytes"}}, path)
    return path


@pytest.fixture(scope="module")
def enc():
    from base_data_preparer import get_tokenizer
    return get_tokenizer("bytes")


@pytest.mark.parametrize("kind", list(KINDS))
def test_embeddings_have_the_documented_shapes_and_definition(kind, enc):
    from embed import embed, embedding_kind, token_embeddings
    name, overrides = KINDS[kind]
    model = random_model(name, **overrides)
    assert embedding_kind(model) == kind
    width = 2 * C if kind == "dual" else C
    E = embed(model, enc, TEXTS, batch_size=len(TEXTS))    # one padded batch of very different lengths
    assert E.shape == (len(TEXTS), width) and E.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(E, axis=1), 1.0, atol=1e-5)
    assert np.array_equal(E, embed(model, enc, TEXTS, batch_size=len(TEXTS)))        # deterministic
    alone = np.stack([embed(model, enc, [t])[0] for t in TEXTS])                     # padding changes nothing
    np.testing.assert_allclose(E, alone, atol=1e-5)
    tokens = token_embeddings(model, enc, TEXTS, batch_size=2)
    lengths = [min(len(t.encode()), 62) for t in TEXTS]                             # 64 - two <|endoftext|>
    assert [t.shape for t in tokens] == [(n, width) for n in lengths]
    np.testing.assert_allclose(np.linalg.norm(tokens[1], axis=1), 1.0, atol=1e-5)
    # The definition, by hand, for one text: <|endoftext|> text <|endoftext|>, the text's features averaged.
    ids = torch.tensor([[enc.eot_token] + list(TEXTS[0].encode()) + [enc.eot_token]])
    with torch.no_grad():
        if kind == "dual":
            fw, bw = (model.features(ids, direction=d)[0, 1:-1].mean(0) for d in ("fw", "bw"))
            want = torch.cat([F.normalize(fw, dim=0), F.normalize(bw, dim=0)]) / 2 ** 0.5
        else:
            want = F.normalize(model.features(ids)[0, 1:-1].mean(0), dim=0)
    np.testing.assert_allclose(E[0], want.numpy(), atol=1e-5)


def test_only_encoders_and_dual_see_the_end_of_the_text(enc):
    """Changing the last word moves the first token's vector for mntp and dual (bw half), not for causal."""
    from embed import token_embeddings
    a, b = "Tom has 3 apples and 4 pears", "Tom has 3 apples and 4 plums"
    moved = {}
    for kind, (name, overrides) in KINDS.items():
        ta, tb = token_embeddings(random_model(name, **overrides), enc, [a, b])
        moved[kind] = not np.allclose(ta[0], tb[0], atol=1e-5)
    assert moved == {"causal": False, "mntp": True, "dual": True}


def test_maxsim():
    from embed import maxsim
    q = [np.array([[1.0, 0.0], [0.0, 1.0]], dtype=np.float32)]
    docs = [np.array([[1.0, 0.0]], dtype=np.float32), np.array([[0.6, 0.8], [-1.0, 0.0]], dtype=np.float32)]
    np.testing.assert_allclose(maxsim(q, docs), [[0.5, 0.7]], atol=1e-6)
    rng = np.random.default_rng(0)
    qs = [rng.normal(size=(n, 5)).astype(np.float32) for n in (3, 7)]
    ds = [rng.normal(size=(n, 5)).astype(np.float32) for n in (1, 4, 9)]
    brute = [[(q @ d.T).max(1).mean() for d in ds] for q in qs]
    np.testing.assert_allclose(maxsim(qs, ds), brute, rtol=1e-5, atol=1e-5)


def test_retrieval_metrics():
    import bench.retrieval as r
    scores = np.array([[0.9, 0.1, 0.0], [0.5, 0.2, 0.7], [0.3, 0.2, 0.1]])
    m = r.rank_metrics(scores, np.array([0, 2, 2]))             # ranks 1, 1, 3
    assert m == {"recall@1": 2 / 3, "recall@10": 1.0, "mrr": pytest.approx((1 + 1 + 1 / 3) / 3)}
    assert r.random_metrics(100)["recall@10"] == 0.1
    assert r.random_metrics(2)["mrr"] == pytest.approx(0.75)
    docs = ["48 clips in April", "a train at 60 km per hour", "12 apples and 7 pears"]
    assert r.rank_metrics(r.tfidf_scores(docs, docs), np.arange(3))["recall@1"] == 1.0
    shifted = np.array([[1.0, 10.0], [-1.0, 10.0]])  # a shared direction that carries no information
    np.testing.assert_allclose(r.centered(shifted), [[1.0, 0.0], [-1.0, 0.0]])


def test_embed_command_line_and_retrieval_bench(tmp_path, capsys):
    import embed
    paths = {kind: save(random_model(name, **o), tmp_path / f"{kind}.pt") for kind, (name, o) in KINDS.items()}
    texts = tmp_path / "texts.jsonl"
    texts.write_text("".join(json.dumps({"question": t}) + "\n" for t in TEXTS))
    out = tmp_path / "e.npy"
    assert embed.main(["--checkpoint", str(paths["dual"]), "--input", str(texts), "--field", "question",
                       "--out", str(out)]) == 0
    assert np.load(out).shape == (len(TEXTS), 2 * C)
    assert embed.main(["--checkpoint", str(paths["mntp"]), "--input", str(texts), "--field", "question",
                       "--out", str(tmp_path / "t.npz"), "--tokens"]) == 0
    saved = np.load(tmp_path / "t.npz")
    assert saved["offsets"][-1] == len(saved["tokens"]) and len(saved["offsets"]) == len(TEXTS) + 1
    capsys.readouterr()
    assert embed.main(["--checkpoint", str(paths["causal"]), "--input", str(texts), "--out",
                       str(tmp_path / "k.npy"), "--kind", "mntp"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "mntp" in err[0]
    before = out.read_bytes()  # an existing output is kept unless --overwrite
    assert embed.main(["--checkpoint", str(paths["causal"]), "--input", str(texts), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--overwrite" in err[0] and out.read_bytes() == before
    assert embed.main(["--checkpoint", str(paths["causal"]), "--input", str(texts), "--out", str(out),
                       "--overwrite"]) == 0
    assert np.load(out).shape == (len(TEXTS), C)
    result = run_script("bench/retrieval.py", "--causal", paths["causal"], "--mntp", paths["mntp"], "--dual",
                        paths["dual"], "--pairs", "train", "--limit", 12, "--out", tmp_path / "r.json")
    assert result.returncode == 0, result.stderr
    rows = json.loads((tmp_path / "r.json").read_text())["rows"]
    scorings = ("pooled", "pooled, centered", "maxsim")
    assert [(x["kind"], x["scoring"]) for x in rows][2:] == [(k, s) for k in KINDS for s in scorings]
    assert all(0 <= x["recall@1"] <= x["recall@10"] <= 1 for x in rows) and "| dual | maxsim |" in result.stdout


def test_input_that_is_not_text_is_refused_in_one_line(tmp_path, capsys):
    """A non-UTF-8 --input ended in a UnicodeDecodeError traceback; a JSON field with a lone surrogate was
    embedded as U+FFFD without a word (the data preparer refuses both)."""
    import embed
    (tmp_path / "latin1.txt").write_bytes("What is 2 + 3?\ncaf\xe9\n".encode("latin-1"))
    (tmp_path / "sur.jsonl").write_text('{"q": "What is 2 + 3?"}\n{"q": "x \\ud800 y"}\n')
    for argv, words in ((["--input", str(tmp_path / "latin1.txt")], ("not valid UTF-8", "byte offset 18")),
                        (["--input", str(tmp_path / "sur.jsonl"), "--field", "q"], ("line 2", "lone surrogate"))):
        code = embed.main(["--checkpoint", "no.pt", "--out", str(tmp_path / "e.npy"), *argv])
        err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
        assert code == 2 and len(err) == 1 and all(w in err[0] for w in words), err
    with pytest.raises(embed.EmbedError, match="lone surrogate"):
        embed.read_texts(tmp_path / "sur.jsonl", "q")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latin1.txt", "sur.jsonl"]
