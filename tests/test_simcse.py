"""train_simcse.py: the loss against sentence-transformers', pooling without padding, the refusals, the texts
(train split only), dropout (two views differ, evaluation is repeatable), exact --resume, embed.py and the
retrieval bench on its checkpoints."""

import dataclasses
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import run_script
from test_answer_loss import trainer
from test_train import assert_one_line_error

SIMCSE = ["--batch-size", 4, "--max-len", 32, "--eval-batches", 2]


def simcse_trainer(base, out, *extra):
    """A SimCSETrainer built in this process from a train_simcse.py command line."""
    from train_simcse import SimCSETrainer, resolve
    name, cfg, typed = resolve([str(a) for a in ["--checkpoint", base / "checkpoint.pt", "--out-dir", out,
                                                 *SIMCSE, *extra]])
    return SimCSETrainer(name, cfg, typed)


def rows(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def base_run(data_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("base") / "run"
    assert trainer(data_dir, out, "--max-steps", 2, "--eval-interval", 2).train() == 0
    return out


# ---- the objective -------------------------------------------------------------------------------

@pytest.mark.parametrize("temperature", [0.05, 0.2])
def test_loss_is_sentence_transformers_multiple_negatives_ranking_loss(temperature):
    """The same number and gradient as sentence-transformers' MultipleNegativesRankingLoss (cos_sim, scale =
    1 / temperature, its default direction query -> document) on the same two views, called through its forward
    with a stand-in model that returns the embeddings it is given."""
    from sentence_transformers.sentence_transformer.losses import MultipleNegativesRankingLoss
    from train_simcse import simcse_loss

    class StandIn(torch.nn.Module):
        def forward(self, features):
            return {"sentence_embedding": features["embedding"]}

    g = torch.Generator().manual_seed(0)
    z1 = torch.randn(8, 16, generator=g, requires_grad=True)
    z2 = (z1.detach() + 1.5 * torch.randn(8, 16, generator=g)).requires_grad_(True)
    ours = simcse_loss(z1, z2, temperature)
    theirs = MultipleNegativesRankingLoss(StandIn(), scale=1 / temperature)([{"embedding": z1}, {"embedding": z2}],
                                                                           None)
    torch.testing.assert_close(ours, theirs)
    ours_grad = torch.autograd.grad(ours, (z1, z2))
    theirs_grad = torch.autograd.grad(theirs, (z1, z2))
    for a, b in zip(ours_grad, theirs_grad):
        torch.testing.assert_close(a, b)
    assert ours > 0.01  # not a trivially solved batch: the check can fail


def test_alignment_and_uniformity_are_wang_and_isolas():
    from train_simcse import alignment, uniformity
    z1, z2 = torch.randn(6, 5), torch.randn(6, 5)
    u1, u2 = F.normalize(z1, dim=-1), F.normalize(z2, dim=-1)
    torch.testing.assert_close(alignment(z1, z2), ((u1 - u2).norm(dim=1) ** 2).mean())
    pairs = [torch.exp(-2 * (u1[i] - u1[j]).norm() ** 2) for i in range(6) for j in range(6) if i != j]
    torch.testing.assert_close(uniformity(z1), torch.stack(pairs).mean().log())


# ---- pooling -------------------------------------------------------------------------------------

def test_pooling_by_hand_with_right_and_left_padding():
    from embed import pool
    h = torch.arange(2 * 6 * 2, dtype=torch.float32).view(2, 6, 2)
    # row 0: <eot> t t t <eot> pad (right padding); row 1: pad pad <eot> t t <eot> (left padding)
    text = torch.tensor([[0, 1, 1, 1, 0, 0], [0, 0, 0, 1, 1, 0]], dtype=torch.bool)
    want = {"mean": [h[0, 1:4].mean(0), h[1, 3:5].mean(0)],
            "weighted-mean": [(1 * h[0, 1] + 2 * h[0, 2] + 3 * h[0, 3]) / 6, (1 * h[1, 3] + 2 * h[1, 4]) / 3],
            "last": [h[0, 3], h[1, 4]], "eos": [h[0, 4], h[1, 5]]}
    for pooling, (a, b) in want.items():
        torch.testing.assert_close(pool(h, text, pooling), torch.stack([a, b]), msg=pooling)


@pytest.mark.parametrize("pooling", ["mean", "weighted-mean", "last", "eos"])
def test_padding_never_enters_a_pooled_vector(pooling):
    """A text alone (no padding) and in a batch of longer texts (padded to --max-len) pool the same."""
    from models import create_model
    from train_simcse import two_views
    torch.manual_seed(0)
    model = create_model("baseline_gpt2", preset="tiny", vocab_size=320, block_size=32, n_layer=2, n_head=2,
                         n_embd=32, attention="bidirectional").eval()
    lengths = [5, 30, 17]

    def batch(lens, T):
        ids = torch.randint(0, 256, (len(lens), T))
        text, real = torch.zeros(len(lens), T, dtype=torch.bool), torch.zeros(len(lens), T, dtype=torch.bool)
        for r, n in enumerate(lens):
            ids[r, 0], ids[r, n + 1] = 256, 256
            text[r, 1:n + 1], real[r, :n + 2] = True, True
        return ids, text, real
    ids, text, real = batch(lengths, 32)
    with torch.no_grad():
        together, _ = two_views(model, ids, text, real, pooling)
        for r, n in enumerate(lengths):
            alone, _ = two_views(model, ids[r:r + 1, :n + 2], text[r:r + 1, :n + 2], real[r:r + 1, :n + 2], pooling)
            torch.testing.assert_close(together[r], alone[0], atol=1e-5, rtol=1e-5)
        scrambled = ids.masked_fill(~real, 7)  # what the padding holds changes nothing either
        torch.testing.assert_close(two_views(model, scrambled, text, real, pooling)[0], together)


# ---- the command line: refusals ------------------------------------------------------------------

def save_random(name, path, **overrides):
    from checkpoint import CHECKPOINT_FORMAT
    from models import create_model
    model = create_model(name, preset="tiny", vocab_size=320, block_size=32, n_layer=1, n_head=2, n_embd=32,
                         **overrides)
    torch.save({"format": CHECKPOINT_FORMAT, "model_name": model.name, "model_config": dataclasses.asdict(model.config),
                "model_state": model.state_dict(), "model_extra_state": model.extra_state(),
                "config": {"tokenizer": "bytes", "lr": 1e-3, "min_lr": 1e-4, "data": "synthetic-math"}}, path)
    return path


REFUSED = {"--dropout 0": (["--dropout", "0"], "same view"),
           "--dropout 1": (["--dropout", "1"], "below 1"),
           "--batch-size 1": (["--batch-size", "1"], "no negatives"),
           "--temperature 0": (["--temperature", "0"], "--temperature must be > 0"),
           "--temperature -1": (["--temperature", "-1"], "--temperature must be > 0"),
           "--max-len 33": (["--max-len", "33"], "--max-len 33 must lie in 3..32"),
           "--seq-len": (["--seq-len", "16"], "--seq-len"),
           "--loss-on answer": (["--loss-on", "answer"], "do not apply")}


@pytest.mark.parametrize("case", list(REFUSED))
def test_bad_settings_are_one_line_exit_2_and_nothing_written(case, tmp_path, capsys):
    import train_simcse
    base = save_random("baseline_gpt2", tmp_path / "base.pt")
    args, words = REFUSED[case]
    code = train_simcse.run(train_simcse.SimCSETrainer, ["--checkpoint", str(base), "--out-dir", str(tmp_path / "out"),
                                                         "--data-dir", str(tmp_path / "data"), *args],
                            train_simcse.resolve)
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert code == 2 and len(err) == 1 and err[0].startswith("error: ") and words in err[0], err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["base.pt"]


def test_command_line_refuses_dropout_0_and_a_model_without_attention_option(tmp_path):
    dual = save_random("dual_mask_gpt", tmp_path / "dual.pt")
    assert_one_line_error(run_script("train_simcse.py", "--checkpoint", dual, "--out-dir", tmp_path / "d",
                                     "--data-dir", tmp_path / "data"), "attention option")
    base = save_random("baseline_gpt2", tmp_path / "base.pt")
    result = run_script("train_simcse.py", "--checkpoint", base, "--out-dir", tmp_path / "o", "--data-dir",
                        tmp_path / "data", "--dropout", "0")
    assert result.returncode == 2
    assert_one_line_error(result, "--dropout 0", "same view")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["base.pt", "dual.pt"]


# ---- what trains on what -------------------------------------------------------------------------

MARK = "~"  # a byte that only val and test documents hold


def marked_corpus(path):
    """A text:PATH file (documents apart by blank lines) of 40 train documents without MARK and 8 val and 8 test
    documents with it (the preparer splits by a hash of the text, so each document is written as the split it
    lands in needs: plain in train, marked in val and test)."""
    from data_file_utils import split_of_text
    want = {"train": 40, "val": 8, "test": 8}
    docs, i = {k: [] for k in want}, 0
    while any(len(docs[k]) < n for k, n in want.items()):
        plain = f"Note {i}: {i} plus {i % 7} makes {i + i % 7}."
        split = split_of_text(plain).value
        text = plain if split == "train" else f"{plain} {MARK}"
        if split_of_text(text).value == split and len(docs[split]) < want[split]:
            docs[split].append(text)
        i += 1
    path.write_text("\n\n".join(d for k in want for d in docs[k]) + "\n")
    return docs


def test_texts_come_from_the_train_split_only(base_run, tmp_path, monkeypatch):
    import train_simcse
    docs = marked_corpus(tmp_path / "corpus.txt")
    seen, forward = [], train_simcse.SimCSEStep.forward

    def recording(self, x, y, loss_mask, step, key_mask=None):
        if torch.is_grad_enabled():  # a training step, not an evaluation
            seen.extend(bytes(t for t in row[m].tolist()).decode() for row, m in zip(x, y))
        return forward(self, x, y, loss_mask, step, key_mask)
    monkeypatch.setattr(train_simcse.SimCSEStep, "forward", recording)
    t = simcse_trainer(base_run, tmp_path / "run", "--data", f"text:{tmp_path / 'corpus.txt'}", "--data-dir",
                       tmp_path / "data", "--max-len", 64, "--max-steps", 12, "--eval-interval", 12)
    assert t.train() == 0
    assert len(seen) == 12 * 4 and not any(MARK in text for text in seen)
    assert set(seen[:40]) == set(docs["train"])  # one epoch is every train document once (40 = 10 batches)
    assert seen[40:] != seen[:8]                  # the next epoch, in another order
    val = t.make_loader("val")
    ids, text, _ = val.next_batch()
    assert all(MARK in bytes(row[m].tolist()).decode() for row, m in zip(ids, text))  # the marker is there to find


def test_dropout_makes_two_views_and_evaluation_repeats(base_run, tmp_path):
    from components import SelfAttention
    from train_simcse import two_views
    t = simcse_trainer(base_run, tmp_path / "run", "--max-steps", 1)
    attention = [m for m in t.model.modules() if isinstance(m, SelfAttention)]
    assert t.model.config.dropout == 0.3 and attention and all(m.dropout == 0.3 for m in attention)
    assert t.model.config.attention == "bidirectional"
    x, text, _, key = t.next_batch(t.train_loader)
    with torch.no_grad():
        z1, z2 = two_views(t.model, x, text, key, "mean")        # training mode: dropout on
        assert (z1 - z2).abs().max() > 1e-4
        t.model.eval()
        e1, e2 = two_views(t.model, x, text, key, "mean")
        assert torch.equal(e1, e2)                                # without dropout the views are one view
        t.model.train()
    state = torch.get_rng_state()
    first = t.evaluate("val")
    assert torch.equal(torch.get_rng_state(), state)              # the training's random state is untouched
    torch.rand(100)                                               # another random state, as after more steps
    second = t.evaluate("val")
    assert first == second and first["alignment"] > 0             # the same dropout masks, still two views
    t.release_run_folder()


def test_resume_with_dropout_is_bit_identical(base_run, tmp_path, monkeypatch):
    from fault_run import plant
    args = ["--max-steps", 6, "--eval-interval", 3, "--checkpoint-interval", 2]
    assert simcse_trainer(base_run, tmp_path / "whole", *args).train() == 0

    class Died(Exception):
        pass

    def die():
        raise Died()
    plant("kill_after_step:3", monkeypatch.setattr, die)
    with pytest.raises(Died):
        simcse_trainer(base_run, tmp_path / "cut", *args).train()
    monkeypatch.undo()
    from train_simcse import SimCSETrainer, resolve
    name, cfg, typed = resolve(["--out-dir", str(tmp_path / "cut"), "--resume"])
    assert SimCSETrainer(name, cfg, typed).train() == 0

    def figures(out):
        return [(r["step"], r["split"], r["loss"], r["alignment"], r["uniformity"]) for r in rows(out)]
    whole = figures(tmp_path / "whole")
    assert figures(tmp_path / "cut") == whole and len(whole) == 6 + 3 + 1  # train rows, val at 0/3/6, test
    assert all(r[3] > 0 for r in whole)  # dropout was on: the two views differed at every step


# ---- using the encoder ---------------------------------------------------------------------------

def test_embed_and_the_retrieval_bench_take_a_simcse_checkpoint(base_run, tmp_path, capsys):
    import embed
    import bench.retrieval as retrieval
    from base_data_preparer import get_tokenizer
    from checkpoint import load_model
    out = tmp_path / "simcse"
    assert simcse_trainer(base_run, out, "--max-steps", 2, "--eval-interval", 2, "--pooling", "last").train() == 0
    model, ckpt = load_model(out / "checkpoint.pt")
    assert model.config.attention == "bidirectional" and not any("lora" in k for k in ckpt["model_state"])
    assert ckpt["config"]["pooling"] == "last" and embed.embedding_kind(model, ckpt) == "simcse"
    texts = tmp_path / "texts.txt"
    texts.write_text("What is 2 + 3?\nNatalia sold 48 clips in April and half as many in May.\nx\n")
    enc = get_tokenizer("bytes")
    lines = texts.read_text().splitlines()
    for argv, pooling in (([], "last"), (["--pooling", "mean"], "mean")):
        assert embed.main(["--checkpoint", str(out), "--input", str(texts), "--out", str(tmp_path / "e.npy"),
                           "--overwrite", *argv]) == 0
        assert f"simcse embeddings of 3 texts (3 x 32, {pooling} pooling)" in capsys.readouterr().out
        np.testing.assert_allclose(np.load(tmp_path / "e.npy"), embed.embed(model, enc, lines, pooling=pooling),
                                   atol=1e-6)
    assert not np.allclose(embed.embed(model, enc, lines, pooling="last"), embed.embed(model, enc, lines))
    assert embed.main(["--checkpoint", str(out), "--input", str(texts), "--out", str(tmp_path / "k.npy"),
                       "--kind", "mntp"]) == 2
    assert "gives simcse embeddings" in capsys.readouterr().err
    table = tmp_path / "r.json"
    assert retrieval.main(["--causal", str(base_run), "--causal-simcse", str(out), "--pairs", "train", "--limit", "6",
                           "--no-maxsim", "--out", str(table)]) == 0
    got = [(r["kind"], r["scoring"]) for r in json.loads(table.read_text())["rows"]][2:]
    assert got == [(k, s) for k in ("causal", "causal + simcse") for s in ("pooled", "pooled, centered")]
    assert json.loads(table.read_text())["runs"]["causal + simcse"]["pooling"] == "last"
    capsys.readouterr()
    assert retrieval.main(["--mntp-simcse", str(out), "--pairs", "train", "--limit", "6"]) == 2
    assert "give it to --causal-simcse" in capsys.readouterr().err
