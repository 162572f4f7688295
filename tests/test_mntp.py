"""train_mntp.py: masking rate, the predict-from-the-previous-position shift, the bidirectional switch, the run."""

import json

import pytest
import torch

from conftest import run_script
from test_answer_loss import trainer
from test_train import assert_one_line_error

MASK = 99


def test_masking_rate_and_never_the_first_position():
    from train_mntp import mntp_mask
    x = torch.randint(0, 50, (8, 101))
    inputs, masked = mntp_mask(x, 0.2, MASK, torch.Generator().manual_seed(0))
    assert masked.sum(1).tolist() == [20] * 8              # round(0.2 * 100) per row, exactly
    assert not masked[:, 0].any()
    assert torch.equal(inputs[masked], torch.full((160,), MASK)) and torch.equal(inputs[~masked], x[~masked])
    _, again = mntp_mask(x, 0.2, MASK, torch.Generator().manual_seed(0))
    _, other = mntp_mask(x, 0.2, MASK, torch.Generator().manual_seed(1))
    assert torch.equal(again, masked) and not torch.equal(other, masked)
    # over many rows every position 1..T-1 is chosen about equally often
    _, many = mntp_mask(torch.zeros(4000, 11, dtype=torch.long), 0.3, MASK, torch.Generator().manual_seed(2))
    freq = many.float().mean(0)
    assert freq[0] == 0 and torch.allclose(freq[1:], torch.full((10,), 0.3), atol=0.03)


class Oracle(torch.nn.Module):
    """Knows the original tokens. For every masked input position i it puts a confident logit for the original
    token at row i - shift (shift 1: the previous position, LLM2Vec's alignment); every other row
    confidently predicts a wrong token."""

    def __init__(self, original, shift):
        super().__init__()
        self.original, self.shift = original, shift

    def forward(self, inputs):
        B, T = inputs.shape
        logits = torch.full((B, T, 128), -20.0)
        logits[..., 127] = 20.0                                   # wrong everywhere ...
        for b, i in (inputs == MASK).nonzero().tolist():
            row = i - self.shift
            if 0 <= row < T:
                logits[b, row, 127] = -20.0
                logits[b, row, self.original[b, i]] = 20.0        # ... except where a masked token is predicted
        return logits, None


def test_masked_token_is_predicted_from_the_previous_position_only():
    from train_mntp import mntp_loss
    x = torch.randint(0, MASK, (4, 40))
    loss, acc = mntp_loss(Oracle(x, shift=1), x, 0.2, MASK, torch.Generator().manual_seed(0))
    assert loss < 1e-6 and acc == 1.0     # only the masked positions count, read at i - 1
    loss, acc = mntp_loss(Oracle(x, shift=0), x, 0.2, MASK, torch.Generator().manual_seed(0))
    assert loss > 10 and acc < 0.2        # the same oracle one position off: wrong


@pytest.fixture(scope="module")
def base_run(data_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("base") / "run"
    assert trainer(data_dir, out, "--max-steps", 3, "--eval-interval", 3).train() == 0
    return out


def test_mntp_run_makes_a_bidirectional_encoder(base_run, tmp_path):
    from checkpoint import load_model
    from train_mntp import MNTPTrainer, resolve
    out = tmp_path / "mntp"
    name, cfg, typed = resolve(["--checkpoint", str(base_run / "checkpoint.pt"), "--out-dir", str(out),
                                "--max-steps", "2", "--eval-interval", "2"])
    t = MNTPTrainer(name, cfg, typed)
    assert cfg["mask_token"] == 257 and cfg["mask_rate"] == 0.2      # the first id above bytes' 0..256
    base, _ = load_model(base_run / "checkpoint.pt")
    assert torch.allclose(t.model.wte.weight[257], base.wte.weight[:257].mean(0))
    assert all("lora_" in n for n, p in t.model.named_parameters() if p.requires_grad)
    # The switch is real: position i now sees i + 1 (and did not before).
    x = torch.randint(0, 256, (1, 32))
    y = x.clone()
    y[0, 11] = (x[0, 11] + 1) % 256
    t.model.eval()
    with torch.no_grad():
        assert not torch.allclose(t.model(x)[0][0, 10], t.model(y)[0][0, 10])
        torch.testing.assert_close(base(x)[0][0, 10], base(y)[0][0, 10])
    t.model.train()
    assert t.train() == 0
    encoder, ckpt = load_model(out / "checkpoint.pt")
    assert encoder.config.attention == "bidirectional" and ckpt["config"]["mask_token"] == 257
    assert not any("lora" in k for k in ckpt["model_state"])
    val = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if '"val"' in line]
    assert len(val) == 2 and {"loss", "acc"} <= set(val[-1]) and "bpb" not in val[-1]


def test_train_mntp_refuses_models_without_an_attention_switch(data_dir, tmp_path):
    dual = tmp_path / "dual"
    assert trainer(data_dir, dual, "--max-steps", 1, "--eval-interval", 1, model="dual_mask_gpt").train() == 0
    assert_one_line_error(run_script("train_mntp.py", "--checkpoint", dual / "checkpoint.pt", "--out-dir",
                                     tmp_path / "m"), "attention option")


def test_finetune_refuses_an_encoder_whose_next_token_loss_would_see_the_targets(tmp_path):
    """finetune.py on an MNTP checkpoint trained next-token prediction with bidirectional attention: position i
    sees token i + 1, its target, and the val/test losses it logged were partly copied from the future (a 150-step
    fine-tune of a tiny MNTP encoder: val 2.09 as logged, 2.28 with the same weights run causally)."""
    import dataclasses
    from checkpoint import CHECKPOINT_FORMAT
    from base_trainer import TrainError
    from finetune import resolve_config
    from models import create_model
    model = create_model("baseline_gpt2", preset="tiny", vocab_size=320, block_size=32, n_layer=1, n_head=2, n_embd=32,
                         attention="bidirectional")
    ckpt = tmp_path / "encoder.pt"
    torch.save({"format": CHECKPOINT_FORMAT, "model_name": model.name, "model_config": dataclasses.asdict(model.config),
                "model_state": model.state_dict(), "model_extra_state": {},
                "config": {"tokenizer": "bytes", "lr": 1e-3, "min_lr": 1e-4, "data": "synthetic-math"}}, ckpt)
    with pytest.raises(TrainError, match="encoder .*see its target"):
        resolve_config(["--checkpoint", str(ckpt), "--out-dir", str(tmp_path / "ft")])
    assert not (tmp_path / "ft").exists()
