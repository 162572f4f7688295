"""Answer-only loss, filler tokens and fine-tuning (base_trainer.py --loss-on / --filler-token, finetune.py)."""

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import TINY_TOKENS, run_script
from test_train import assert_one_line_error

SMALL = ["--n-layer", 2, "--n-head", 2, "--n-embd", 32, "--micro-batch-size", 4, "--seq-len", 64,
         "--total-batch-size", 256, "--eval-batches", 2]
FILLER = "~"  # one byte: one token of the byte tokenizer


def trainer(data_dir, out_dir, *extra, model="baseline_gpt2", max_tokens=TINY_TOKENS):
    """A BaseTrainer built in this process, as train_<model>.py would build it."""
    from base_trainer import BaseTrainer, resolve_config
    args = ["--preset", "tiny", "--data-dir", data_dir, "--out-dir", out_dir, *SMALL, *extra]
    if max_tokens:
        args += ["--max-tokens", max_tokens]
    cfg, typed = resolve_config(model, [str(a) for a in args])
    return BaseTrainer(model, cfg, typed)


def hand_answer_mask(tokens, eot):
    """1 for every token after '\\nAnswer:' up to and including the <|endoftext|> that ends the answer,
    found by scanning the byte-level stream (independent of the preparer's mask shards)."""
    text = bytes(int(t) if t != eot else 0 for t in tokens)
    mask = np.zeros(len(tokens), dtype=np.float32)
    start = 0
    while (i := text.find(b"\nAnswer:", start)) >= 0:
        begin = i + len(b"\nAnswer:")
        end = text.find(b"\0", begin)
        end = len(tokens) - 1 if end < 0 else end
        mask[begin:end + 1] = 1.0
        start = end
    return mask


@pytest.mark.parametrize("loss_on", ["answer", "all"])
def test_answer_only_loss_equals_a_hand_masked_cross_entropy(data_dir, tmp_path, loss_on):
    t = trainer(data_dir, tmp_path / "run", "--loss-on", loss_on)
    info = t.train_loader.manifest["splits"]["train"]
    stream = np.fromfile(t.dataset_dir / info["shards"][0], dtype=np.uint16)
    x, y, loss_mask, key_mask = t.next_batch(t.train_loader)  # chunk 0: the stream's first B*T + 1 tokens
    assert key_mask is None
    n = x.numel()
    assert torch.equal(y.flatten(), torch.from_numpy(stream[1:n + 1].astype(np.int64)))
    with torch.no_grad():
        loss, _ = t.step_module(x, y, loss_mask, 0, key_mask)
        logits, _ = t.model(x)
    if loss_on == "all":
        assert loss_mask is None
        want = F.cross_entropy(logits.flatten(0, 1), y.flatten())
    else:
        hand = torch.from_numpy(hand_answer_mask(stream[:n + 1], t.train_loader.eot_token)[1:]).view_as(y)
        assert torch.equal(loss_mask, hand)
        assert 0 < hand.sum() < n and bool((y[hand > 0] == t.train_loader.eot_token).any())  # answer ends count
        sel = hand.flatten() > 0
        want = F.cross_entropy(logits.flatten(0, 1)[sel], y.flatten()[sel])
    torch.testing.assert_close(loss, want, rtol=1e-5, atol=1e-6)


def test_accumulated_answer_gradient_is_the_token_mean_of_the_whole_step(data_dir, tmp_path):
    """4 micro-steps with different numbers of answer tokens give the gradient (and the logged loss) of one big
    batch's token mean, not a mean of the micro-batches' means (which made the gradient 32% off here)."""
    import copy
    from dataloader import TokenDataLoader
    t = trainer(data_dir, tmp_path / "run", "--loss-on", "answer", "--micro-batch-size", 2, "--seq-len", 32,
                "--total-batch-size", 256, "--grad-clip", 1e9)
    assert t.grad_accum == 4
    ref = copy.deepcopy(t.model)
    x, y, mask = TokenDataLoader(t.dataset_dir, "train", 8, 32, with_loss_mask=True, score_answer_end=True).next_batch()
    counts = mask.view(4, -1).sum(1)
    assert counts.min() < counts.max()  # the micro-batches score different numbers of tokens
    grads = {}
    t.optimizer.step = lambda: grads.update({n: p.grad.clone() for n, p in t.model.named_parameters()})
    row = t.train_step()
    losses = F.cross_entropy(ref(x)[0].flatten(0, 1), y.flatten(), reduction="none")
    want = (losses * mask.flatten()).sum() / mask.sum()
    want.backward()
    assert row["loss"] == pytest.approx(want.item(), rel=1e-5)
    for name, p in ref.named_parameters():
        torch.testing.assert_close(grads[name], p.grad, rtol=1e-4, atol=1e-6)


def test_answer_only_evaluation_is_a_token_mean_not_a_mean_of_batch_means(data_dir, tmp_path):
    """The trainer's val/test row and evaluate.py weigh each batch by the answer tokens it holds. The first 4
    test batches of 2 x 32 hold 0, 64, 64 and 14: the mean of the batch means was 4.31 here (the empty
    batch counted as a loss of 0) against a token mean of 5.77."""
    from dataloader import TokenDataLoader
    from evaluate import test_loss
    t = trainer(data_dir, tmp_path / "run", "--loss-on", "answer", "--micro-batch-size", 2, "--seq-len", 32,
                "--total-batch-size", 128, "--eval-batches", 4)
    x, y, mask = TokenDataLoader(t.dataset_dir, "test", 8, 32, with_loss_mask=True, score_answer_end=True).next_batch()
    counts = mask.view(4, -1).sum(1)
    assert counts.min() < counts.max()
    t.model.eval()
    with torch.no_grad():
        losses = F.cross_entropy(t.model(x)[0].flatten(0, 1), y.flatten(), reduction="none")
    want = ((losses * mask.flatten()).sum() / mask.sum()).item()
    row = t.evaluate("test")
    assert row["loss"] == pytest.approx(want, rel=1e-5)
    assert row["loss_all"] == pytest.approx(losses.mean().item(), rel=1e-5)
    loader = TokenDataLoader(t.dataset_dir, "test", 2, 32, with_loss_mask=True, score_answer_end=True)
    got = test_loss(t.model, loader, 4, show_progress=False)
    assert got["answer_loss"] == pytest.approx(want, rel=1e-5)
    assert got["loss"] == pytest.approx(row["loss_all"], rel=1e-5)


def test_loss_on_is_saved_and_kept_by_resume(data_dir, tmp_path):
    out = tmp_path / "run"
    t = trainer(data_dir, out, "--loss-on", "answer", "--max-steps", 2, "--eval-interval", 2)
    assert t.train() == 0
    assert json.loads((out / "config.json").read_text())["loss_on"] == "answer"
    val = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()][-1]
    assert {"loss", "loss_all", "bpb"} <= set(val) and val["loss"] != val["loss_all"]
    resumed = trainer(data_dir, out, "--resume", "--max-steps", 3)
    assert resumed.cfg["loss_on"] == "answer" and resumed.with_loss_mask
    from base_trainer import TrainError
    with pytest.raises(TrainError, match="--loss-on all differs"):
        trainer(data_dir, out, "--resume", "--loss-on", "all")


@pytest.fixture(scope="module")
def filler_data(tmp_path_factory):
    """A text dataset whose documents are full of filler: '~' runs inside ordinary sentences."""
    d = tmp_path_factory.mktemp("filler")
    rng = np.random.default_rng(0)
    docs = [f"Item {i}: {FILLER * int(rng.integers(1, 6))} costs {i * 3} {FILLER * 3} dollars." for i in range(2000)]
    (d / "docs.txt").write_text("\n\n".join(docs) + "\n")
    return d


def test_filler_tokens_are_neither_attended_nor_scored(filler_data, tmp_path):
    t = trainer(filler_data / "data", tmp_path / "run", "--data", f"text:{filler_data / 'docs.txt'}",
                "--filler-token", FILLER, max_tokens=None)
    filler = ord(FILLER)
    assert t.filler_id == filler
    x, y, loss_mask, key_mask = t.next_batch(t.train_loader)
    assert bool((x == filler).any()) and bool((y == filler).any())
    assert torch.equal(key_mask, x != filler) and torch.equal(loss_mask, (y != filler).float())
    t.model.eval()
    with torch.no_grad():
        loss, _ = t.step_module(x, y, loss_mask, 0, key_mask)
        logits, _ = t.model(x, key_mask=key_mask)
        keep = (y != filler).flatten()
        torch.testing.assert_close(loss, F.cross_entropy(logits.flatten(0, 1)[keep], y.flatten()[keep]))
        # What sits at a filler position changes no other position's logits ...
        other = x.masked_fill(x == filler, ord("Q"))
        changed, _ = t.model(other, key_mask=key_mask)
        real = x != filler
        torch.testing.assert_close(changed[real], logits[real], rtol=0, atol=1e-5)
        # ... while without the key mask it does (the check can fail).
        assert not torch.allclose(t.model(other)[0][real], t.model(x)[0][real], atol=1e-3)


def test_bad_answer_and_filler_options(data_dir, filler_data, tmp_path):
    from base_trainer import TrainError
    from data_file_utils import DataError
    text = ["--data", f"text:{filler_data / 'docs.txt'}"]
    with pytest.raises(DataError, match="no loss mask"):
        trainer(filler_data / "data", tmp_path / "a", *text, "--loss-on", "answer", max_tokens=None)
    with pytest.raises(TrainError, match="exactly one token"):
        trainer(data_dir, tmp_path / "b", "--filler-token", " blah")
    with pytest.raises(TrainError, match="not supported by dual_mask_gpt"):
        trainer(data_dir, tmp_path / "c", "--filler-token", FILLER, model="dual_mask_gpt")
    result = run_script("train_baseline_gpt2.py", "--preset", "tiny", "--data-dir", filler_data / "data",
                        "--out-dir", tmp_path / "d", *text, "--loss-on", "answer")
    assert_one_line_error(result, "no loss mask", "--loss-on all")


# ---- finetune.py ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def base_run(data_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("base") / "run"
    assert trainer(data_dir, out, "--max-steps", 3, "--eval-interval", 3).train() == 0
    return out


def finetuner(*args):
    from finetune import FinetuneTrainer, resolve_config
    name, cfg, typed = resolve_config([str(a) for a in args])
    return FinetuneTrainer(name, cfg, typed)


def test_lora_finetune_saves_a_plain_merged_model_and_resumes(base_run, tmp_path):
    from checkpoint import load_model
    out = tmp_path / "ft"
    ft = finetuner("--checkpoint", base_run / "checkpoint.pt", "--out-dir", out, "--loss-on", "answer",
                   "--lora-rank", 4, "--max-steps", 3, "--eval-interval", 3, "--lr", 1e-2)
    base, _ = load_model(base_run / "checkpoint.pt")
    trainable = [n for n, p in ft.model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable) and len(ft.lora_layers) == 2 * 4  # 2 blocks x 4
    assert ft.cfg["micro_batch_size"] == 4 and ft.cfg["tokenizer"] == "bytes"  # the base run's settings
    assert ft.train() == 0
    merged, ckpt = load_model(out / "checkpoint.pt")  # a plain baseline_gpt2
    assert not any("lora" in k for k in ckpt["model_state"]) and ckpt["config"]["loss_on"] == "answer"
    x = torch.randint(0, 256, (2, 64))
    ft.model.eval()
    with torch.no_grad():
        torch.testing.assert_close(merged(x)[0], ft.model(x)[0], rtol=1e-4, atol=1e-4)
        assert not torch.allclose(merged(x)[0], base(x)[0], atol=1e-4)  # the fine-tune changed something
    assert torch.equal(merged.wte.weight, base.wte.weight)  # frozen under LoRA
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if r["split"] == "train"] == [0, 1, 2]
    resumed = finetuner("--out-dir", out, "--resume", "--max-steps", 4)
    assert resumed.step == 3 and resumed.train() == 0
    assert torch.load(out / "checkpoint.pt", weights_only=True)["step"] == 4


def test_finetune_refuses_bad_input(base_run, tmp_path):
    args = ["--checkpoint", base_run / "checkpoint.pt", "--out-dir", tmp_path / "x"]
    assert_one_line_error(run_script("finetune.py", *args, "--tokenizer", "gpt2"), "tokenizer")
    assert_one_line_error(run_script("finetune.py", "--out-dir", tmp_path / "y"), "--checkpoint")
    assert_one_line_error(run_script("train_baseline_gpt2.py", "--out-dir", base_run, "--resume", "--loss-on",
                                     "answer"), "--loss-on answer differs")


def test_lora_finetune_keeps_the_progressive_stage_of_its_checkpoint(data_dir, tmp_path):
    """A checkpoint taken in stage 1 (here: stage 2 would start at step 2 of 2) is fine-tuned in stage 1:
    the fine-tune's own max_steps must not restart the stage schedule (stage 2 at step 3 of 4 here), which
    rebuilt the blocks under the LoRA wrappers and saved a checkpoint that fit no model."""
    from checkpoint import load_model
    base = tmp_path / "base"
    assert trainer(data_dir, base, "--n-layer", 4, "--stage2-at", 0.75, "--stage3-at", 1.0, "--max-steps", 2,
                   "--eval-interval", 2, model="progressive_diverging").train() == 0
    ft = finetuner("--checkpoint", base / "checkpoint.pt", "--out-dir", tmp_path / "ft", "--lora-rank", 2,
                   "--max-steps", 4, "--eval-interval", 4, "--lr", 1e-2)
    assert ft.train() == 0 and ft.model.stage == 1
    merged, ckpt = load_model(tmp_path / "ft" / "checkpoint.pt")
    assert merged.stage == 1 and not any("lora" in k for k in ckpt["model_state"])
    x = torch.randint(0, 256, (2, 64))
    ft.model.eval()
    with torch.no_grad():
        torch.testing.assert_close(merged(x)[0], ft.model(x)[0], rtol=1e-4, atol=1e-4)
