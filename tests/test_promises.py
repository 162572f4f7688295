"""Tests that catch the bugs the README says cannot happen. Each test here was checked by planting its bug in the
code (tests/mutants.py keeps those plants as a list) and seeing the test fail.

    schedule        warmup (step + 1) / warmup_steps, cosine down to min_lr (not 0), min_lr after max_steps
    decay groups    weight decay on matrices and embeddings only, for every model, with AdamW and with Muon
    non-finite      an inf gradient with a finite loss stops the run before the update
    clipping        the gradient the optimizer steps on is the clipped one
    progressive     the blocks a stage switch copies have storage of their own and train apart
    resume          exact with dropout (train_<model>.py) and with MNTP's random masks (train_mntp.py)
    DDP             --loss-on answer and --filler-token: 2 processes log the losses of 1
    dual_mask_gpt   the bw direction scores the tokens the fw loss mask scores, shifted with the targets
    bpb             bits per byte from the val tokens and byte counts, computed by hand
"""

import json
import math
import os
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import REPO, TINY_TOKENS, run_script, run_torchrun, train_args

# The internal names these tests need, in one place: retarget them here when code moves between files.
from base_trainer import BaseTrainer, Diverged, lr_at, resolve_config  # a trainer in-process, as train_<model>.py
from models import MODELS, create_model


def project_lr(cfg, step):
    """The trainer's learning-rate schedule at `step` for the settings cfg (lr, min_lr, warmup_steps, max_steps)."""
    return lr_at(step, cfg)


# A model small enough for many runs per test.
SMALL = ("--n-layer", 1, "--n-head", 2, "--n-embd", 32, "--micro-batch-size", 2, "--seq-len", 32,
         "--total-batch-size", 128, "--eval-batches", 2)


def small_sizes(model):
    """SMALL's sizes for another model: its fewest layers (progressive_diverging: 4) or hourglass levels."""
    if model == "baseline_gpt2":
        return SMALL
    fields = set(create_model(model, preset="tiny", vocab_size=64).config.__dataclass_fields__)
    depth = ("--n-layer", 4 if model == "progressive_diverging" else 1) if "n_layer" in fields else ()
    depth += ("--n-levels", 1) if "n_levels" in fields else ()
    return (*SMALL[2:], *depth)  # SMALL without its --n-layer


def trainer(data_dir, out_dir, *extra, model="baseline_gpt2"):
    """A trainer built in this process from a train_<model>.py command line (the tiny preset, SMALL sizes)."""
    args = ["--preset", "tiny", "--data-dir", data_dir, "--max-tokens", TINY_TOKENS, "--out-dir", out_dir,
            *small_sizes(model), *extra]
    cfg, typed = resolve_config(model, [str(a) for a in args])
    return BaseTrainer(model, cfg, typed)


def metrics(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def rows(run_dir, split):
    return [r for r in metrics(run_dir) if r["split"] == split]


def checkpoint(run_dir):
    return torch.load(os.path.join(run_dir, "checkpoint.pt"), weights_only=True)


# ---- 1, 2. the learning-rate schedule -----------------------------------------------------------

def nanogpt_lr(step, max_lr, min_lr, warmup_steps, max_steps):
    """build-nanogpt's get_lr(): linear warmup to max_lr in warmup_steps, cosine to min_lr at max_steps, then min_lr."""
    if step < warmup_steps:
        return max_lr * (step + 1) / warmup_steps
    if step > max_steps:
        return min_lr
    decay_ratio = (step - warmup_steps) / (max_steps - warmup_steps)
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * decay_ratio)) * (max_lr - min_lr)


def test_logged_lr_of_every_step_is_build_nanogpts_schedule(data_dir, tmp_path):
    lr, min_lr, warmup, steps = 1e-2, 2e-3, 4, 12
    t = trainer(data_dir, tmp_path / "run", "--lr", lr, "--min-lr", min_lr, "--warmup-steps", warmup,
                "--max-steps", steps, "--eval-interval", steps)
    assert t.train() == 0
    logged = [(r["step"], r["lr"]) for r in rows(tmp_path / "run", "train")]
    assert [s for s, _ in logged] == list(range(steps))
    for step, got in logged:
        assert got == pytest.approx(nanogpt_lr(step, lr, min_lr, warmup, steps), rel=1e-12), step
    assert logged[0][1] == pytest.approx(lr / warmup)           # the first step already moves
    assert logged[warmup - 1][1] == pytest.approx(lr)           # the peak at the last warmup step
    assert logged[-1][1] > min_lr                                # min_lr is reached at max_steps, not before
    # ... and it is the lr the optimizer stepped with (every group: AdamW's; Muon's has its own scale)
    assert all(g["lr"] == pytest.approx(logged[-1][1], rel=1e-12) for g in t.optimizer.param_groups)


def test_schedule_function_at_its_boundaries():
    cfg = dict(lr=6e-4, min_lr=6e-5, warmup_steps=10, max_steps=50)
    want = {0: 6e-5, 9: 6e-4, 10: 6e-4, 30: 6e-5 + 0.5 * (6e-4 - 6e-5), 50: 6e-5, 51: 6e-5, 500: 6e-5}
    for step, value in want.items():
        assert project_lr(cfg, step) == pytest.approx(value, rel=1e-12), step
    for step in range(0, 80):
        assert project_lr(cfg, step) == pytest.approx(nanogpt_lr(step, 6e-4, 6e-5, 10, 50), rel=1e-12), step
    no_warmup = dict(cfg, warmup_steps=0)
    assert project_lr(no_warmup, 0) == pytest.approx(6e-4)
    for step in range(0, 60):
        assert project_lr(no_warmup, step) == pytest.approx(nanogpt_lr(step, 6e-4, 6e-5, 0, 50), rel=1e-12), step


# ---- 3. weight decay groups ------------------------------------------------------------------------

# Weight decay on matrices and embeddings only (optim.py, README): every kind of trainable parameter the models
# have, by the class of the module that owns it. A new kind must be added here (decide, then document it).
DECAYED = {("Linear", "weight"), ("Embedding", "weight"), ("PositionEmbedding", "weight"),
           ("LoRALinear", "lora_A"), ("LoRALinear", "lora_B")}
NOT_DECAYED = {("Linear", "bias"), ("LayerNorm", "weight"), ("LayerNorm", "bias"), ("RMSNorm", "weight"),
               ("OutputHead", "beta"), ("OutputHead", "log_beta")}


def parameter_kinds(model):
    """{parameter: (module class, parameter name)}; subclasses of the classes named above count as those."""
    named = {kind for kind, _ in DECAYED | NOT_DECAYED}
    kinds = {}
    for module in model.modules():
        cls = next((c.__name__ for c in type(module).__mro__ if c.__name__ in named), type(module).__name__)
        for name, p in module.named_parameters(recurse=False):
            kinds[p] = (cls, name)
    return kinds


@pytest.mark.parametrize("options", [("--head", "clap"), ("--recipe", "modern", "--head", "clap-cosine")],
                         ids=["adamw", "muon"])
@pytest.mark.parametrize("name", list(MODELS))
def test_weight_decay_goes_to_matrices_and_embeddings_only(data_dir, tmp_path, name, options):
    extra = ("--stage2-at", 0, "--stage3-at", 0) if name == "progressive_diverging" else ()  # LoRA from step 0
    t = trainer(data_dir, tmp_path / "run", *options, *extra, "--weight-decay", 0.125, "--muon-weight-decay", 0.03,
                "--max-steps", 1, "--eval-batches", 1, model=name)
    assert t.train() == 0  # one step: progressive_diverging is in stage 3 (LoRA) with its optimizer rebuilt
    muon = "--recipe" in options
    kinds = parameter_kinds(t.model)
    seen = {}
    for group in t.optimizer.param_groups:
        for p in group["params"]:
            assert p not in seen, f"{kinds[p]} is in two groups"
            seen[p] = group
    trainable = [p for p in t.model.parameters() if p.requires_grad]
    assert set(seen) == set(trainable), "the optimizer must hold exactly the trainable parameters"
    counts = {"decayed": 0, "not": 0, "muon": 0}
    for p in trainable:
        kind, group = kinds[p], seen[p]
        assert kind in DECAYED | NOT_DECAYED, f"{name}: new parameter kind {kind}: decide its weight decay here"
        in_muon = "betas" not in group  # torch's AdamW groups have betas, Muon's momentum
        if muon and kind == ("Linear", "weight"):
            assert in_muon and group["weight_decay"] == 0.03, f"{name}: a hidden matrix {kind} belongs to Muon"
            counts["muon"] += 1
            continue
        assert not in_muon, f"{name}: {kind} belongs to AdamW"
        if kind in DECAYED:
            assert group["weight_decay"] == 0.125, f"{name}: {kind} {tuple(p.shape)} must be decayed"
            counts["decayed"] += 1
        else:
            assert group["weight_decay"] == 0.0, f"{name}: {kind} {tuple(p.shape)} must not be decayed"
            counts["not"] += 1
    assert counts["decayed"] >= 1 and counts["not"] >= 3 and (counts["muon"] > 0) == muon, counts
    if name == "progressive_diverging":
        assert t.model.stage == 3 and any(kinds[p][0] == "LoRALinear" for p in trainable)


# ---- 4. the non-finite guard checks the gradient too --------------------------------------------------

def test_an_inf_gradient_with_a_finite_loss_is_not_applied(data_dir, tmp_path):
    out = tmp_path / "run"
    # 64 tokens per step = one micro-batch: the n-th backward pass is step n - 1.
    t = trainer(data_dir, out, "--total-batch-size", 64, "--max-steps", 6, "--checkpoint-interval", 1,
                "--eval-interval", 6)
    bad_step, calls, before = 2, [], {}
    weight = next(p for p in t.model.parameters() if p.dim() == 2)

    def hook(grad):
        calls.append(1)
        if len(calls) - 1 != bad_step:
            return grad
        before.update({k: v.clone() for k, v in t.model.state_dict().items()})  # the weights before this step
        bad = grad.clone()
        bad[0, 0] = float("inf")  # one element: the loss stays finite, the gradient norm does not
        return bad
    weight.register_hook(hook)
    with pytest.raises(Diverged) as stopped:
        t.train()
    assert before, "the faulty step never ran"
    train = rows(out, "train")
    assert [r["step"] for r in train] == list(range(bad_step)) and all(math.isfinite(r["loss"]) for r in train)
    assert [(r["step"], r["action"]) for r in rows(out, "nonfinite")] == [(bad_step, "stopped")]
    after = t.model.state_dict()
    for k, v in before.items():
        assert torch.equal(after[k], v), f"{k} changed: the update of step {bad_step} was applied"
    saved = checkpoint(out)
    assert saved["step"] == bad_step
    for k, v in saved["model_state"].items():
        assert torch.equal(v, before[k]) and bool(v.isfinite().all()), k
    assert f"step {bad_step}: the gradient norm is inf" in str(stopped.value)


def test_weights_that_became_nonfinite_are_never_saved(data_dir, tmp_path):
    """An update that overflows (simulated: the optimizer step leaves one nan weight; loss and gradient were
    finite) is caught when the next checkpoint would be written: refused, and the run stops."""
    out = tmp_path / "run"
    t = trainer(data_dir, out, "--max-steps", 5, "--checkpoint-interval", 1, "--eval-interval", 5)
    real_step, calls = t.optimizer.step, []

    def overflowing_step():
        real_step()
        calls.append(1)
        if len(calls) == 3:  # the third update: the checkpoint after it is refused, the one after two updates kept
            next(t.model.parameters()).data.view(-1)[0] = float("nan")
    t.optimizer.step = overflowing_step
    with pytest.raises(Diverged) as stopped:
        t.train()
    saved = checkpoint(out)
    assert saved["step"] == 2 and all(bool(v.isfinite().all()) for v in saved["model_state"].values())
    assert "step 3: the weights are not finite" in str(stopped.value)


def test_the_optimizer_steps_on_the_clipped_gradient(data_dir, tmp_path):
    clip = 1e-3
    t = trainer(data_dir, tmp_path / "run", "--grad-clip", clip, "--max-steps", 2, "--eval-batches", 1)
    norms = []
    real_step = t.optimizer.step

    def step():
        grads = [p.grad for p in t.model.parameters() if p.grad is not None]
        norms.append(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads])).item())
        real_step()
    t.optimizer.step = step
    assert t.train() == 0
    assert all(r["grad_norm"] > 100 * clip for r in rows(tmp_path / "run", "train"))  # logged: before clipping
    assert norms == [pytest.approx(clip, rel=1e-4)] * 2                                # what the optimizer saw


# ---- 5. progressive_diverging: copies own their storage ---------------------------------------------

def assert_own_storage(model):
    ptrs = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        assert p.data_ptr() not in ptrs, f"{name} shares its storage with {ptrs[p.data_ptr()]}"
        ptrs[p.data_ptr()] = name


def test_stage_copies_have_their_own_storage_and_train_apart(data_dir, tmp_path):
    model = create_model("progressive_diverging", preset=None, vocab_size=64, block_size=16, n_layer=4, n_head=2,
                         n_embd=16)
    assert_own_storage(model)
    for stage in (2, 3):
        model.set_stage(stage)
        assert_own_storage(model)
    # In a run: stage 2 starts at step 2 of 5; after 3 steps in stage 2 the siblings (copies of one block) differ.
    t = trainer(data_dir, tmp_path / "run", "--stage2-at", 0.4, "--stage3-at", 1.0,
                "--max-steps", 5, "--eval-interval", 5, model="progressive_diverging")
    assert t.train() == 0 and t.model.stage == 2
    assert_own_storage(t.model)
    blocks = t.model.blocks
    for i in range(0, len(blocks), 2):
        for (name, a), (_, b) in zip(blocks[i].named_parameters(), blocks[i + 1].named_parameters()):
            if a.requires_grad and "lora_" not in name:  # LoRA's A starts random anyway
                assert not torch.equal(a, b), f"blocks {i} and {i + 1}: {name} still equal after 3 steps"


# ---- 6. --resume restores the random state ------------------------------------------------------------

def killed_and_resumed(script, args, out, kill_at):
    """Run `script args`, killed (SIGKILL) after step kill_at, then resumed: the rows of the whole run."""
    killed = run_script("tests/fault_run.py", f"kill_after_step:{kill_at}", script, *args, "--out-dir", out)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    resumed = run_script(script, *args, "--out-dir", out, "--resume")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resuming at step" in resumed.stdout
    return metrics(out)


def assert_same_losses(got, want):
    for split in ("train", "val", "test"):
        a = [(r["step"], r["loss"]) for r in got if r["split"] == split]
        b = [(r["step"], r["loss"]) for r in want if r["split"] == split]
        assert a == b and a, f"{split} losses differ after the resume:\n{a}\n{b}"


RESUME = ("--max-steps", 6, "--eval-interval", 3, "--checkpoint-interval", 2)


def test_resume_with_dropout_is_bit_identical(data_dir, tmp_path):
    args = ["--preset", "tiny", "--data-dir", data_dir, "--max-tokens", TINY_TOKENS, *SMALL, *RESUME, "--dropout", 0.1]
    whole = run_script("train_baseline_gpt2.py", *args, "--out-dir", tmp_path / "whole")
    assert whole.returncode == 0, whole.stderr[-2000:]
    got = killed_and_resumed("train_baseline_gpt2.py", args, tmp_path / "cut", kill_at=3)
    assert_same_losses(got, metrics(tmp_path / "whole"))
    # The check can fail: dropout is on (it draws from the RNG), the first loss differs from a run without it.
    t = trainer(data_dir, tmp_path / "plain", "--max-steps", 1, "--eval-batches", 1)
    assert t.train() == 0
    assert abs(rows(tmp_path / "plain", "train")[0]["loss"] - rows(tmp_path / "whole", "train")[0]["loss"]) > 1e-5


def test_train_mntp_resume_is_bit_identical(data_dir, tmp_path):
    base = tmp_path / "base"
    assert trainer(data_dir, base, "--max-steps", 2, "--eval-interval", 2).train() == 0
    args = ["--checkpoint", base / "checkpoint.pt", *RESUME]
    whole = run_script("train_mntp.py", *args, "--out-dir", tmp_path / "whole")
    assert whole.returncode == 0, whole.stderr[-2000:]
    got = killed_and_resumed("train_mntp.py", args, tmp_path / "cut", kill_at=3)
    assert_same_losses(got, metrics(tmp_path / "whole"))


# ---- 7. DDP with a loss mask ---------------------------------------------------------------------------

@pytest.mark.parametrize("mask", [("--loss-on", "answer"), ("--filler-token", " ")], ids=["answer", "filler"])
def test_two_processes_with_a_loss_mask_log_the_losses_of_one(data_dir, tmp_path, mask):
    # 1 process: 2 micro-steps of 2 x 32; 2 processes: 1 each. The micro-batches score different token counts.
    args = (*SMALL, "--max-steps", 2, "--eval-interval", 2, *mask)
    one = run_script("train_baseline_gpt2.py", *train_args(data_dir, tmp_path / "one", *args))
    assert one.returncode == 0, one.stderr[-2000:]
    two = run_torchrun("train_baseline_gpt2.py", *train_args(data_dir, tmp_path / "two", *args))
    assert two.returncode == 0, two.stderr[-2000:]
    a, b = rows(tmp_path / "one", "train"), rows(tmp_path / "two", "train")
    assert [r["step"] for r in a] == [r["step"] for r in b] == [0, 1]
    for x, y in zip(a, b):
        assert y["loss"] == pytest.approx(x["loss"], rel=1e-5), (x["loss"], y["loss"])
        assert y["grad_norm"] == pytest.approx(x["grad_norm"], rel=1e-4)


# ---- 8. dual_mask_gpt: the bw loss mask moves with its targets ---------------------------------------------

def test_dual_mask_bw_loss_mask_is_shifted_with_its_targets():
    V, B, T = 40, 3, 12
    torch.manual_seed(0)
    model = create_model("dual_mask_gpt", preset=None, vocab_size=V, block_size=T, n_layer=1, n_head=2, n_embd=16,
                         p_bw=1.0).eval()
    # A window z of T + 1 tokens and whether each token is scored (an "answer" token). The loader gives x = z[:-1],
    # y = z[1:] and the mask of y's tokens; z[0] is no fw target, so its mask is unknown: make it equal z[1]'s.
    g = torch.Generator().manual_seed(1)
    z = torch.randint(0, V - 2, (B, T + 1), generator=g)
    scored = (torch.rand(B, T + 1, generator=g) < 0.5).float()
    scored[:, 0] = scored[:, 1]
    scored[0, 5:9] = torch.tensor([1.0, 0.0, 0.0, 1.0])  # at least some runs that an unshifted mask gets wrong
    x, y, loss_mask = z[:, :-1], z[:, 1:], scored[:, 1:]
    with torch.no_grad():
        # bw: input y, position i predicts x[:, i] (= z[i]); it counts where z[i] is scored
        logits = model(y, direction="bw")[0]
        ce = F.cross_entropy(logits.reshape(-1, V), x.reshape(-1), reduction="none").view(B, T)
        bw_mask = scored[:, :-1]
        want_bw = ((ce * bw_mask).sum() / bw_mask.sum()).item()
        unshifted = ((ce * loss_mask).sum() / loss_mask.sum()).item()
        assert abs(want_bw - unshifted) > 1e-3  # the check can fail
        logits = model(x, direction="fw")[0]
        ce = F.cross_entropy(logits.reshape(-1, V), y.reshape(-1), reduction="none").view(B, T)
        want_fw = ((ce * loss_mask).sum() / loss_mask.sum()).item()
        _, train = model.training_loss(x, y, loss_mask, step=0)
        val = model.evaluation_losses(x, y, loss_mask)
    assert float(train["loss_bw"]) == pytest.approx(want_bw, rel=1e-5)
    assert float(val["loss_bw"]) == pytest.approx(want_bw, rel=1e-5)
    assert float(train["loss_fw"]) == pytest.approx(want_fw, rel=1e-5)
    assert float(val["loss_fw"]) == pytest.approx(want_fw, rel=1e-5)


# ---- bits per byte ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("loss_on", ["all", "answer"])
def test_bits_per_byte_from_the_val_tokens_and_bytes(data_dir, tmp_path, loss_on):
    """bpb = (nats per token over every token) / ln 2 x (tokens / bytes of the split). Here the loss is computed
    from the val tokens and the model, and the counts from the val shards (a byte-level token is one byte)."""
    t = trainer(data_dir, tmp_path / "run", "--max-steps", 1, "--eval-interval", 1, "--loss-on", loss_on)
    assert t.train() == 0
    row = rows(tmp_path / "run", "val")[-1]
    assert row["step"] == 1
    dataset = next(data_dir.glob("synthetic-math*__bytes"))
    manifest = json.loads((dataset / "manifest.json").read_text())
    stream = np.concatenate([np.fromfile(dataset / s, dtype=np.uint16) for s in manifest["splits"]["val"]["shards"]])
    eot = int(manifest["eot_token"])
    n_tokens, n_bytes = len(stream), int((stream != eot).sum())
    assert n_tokens > n_bytes  # one <|endoftext|> per document: tokens per byte is not 1
    B, T, batches = 2, 32, 2   # SMALL: the val rows are the split's first eval-batches x micro-batch windows
    window = torch.from_numpy(stream[:batches * B * T + 1].astype(np.int64))
    x, y = window[:-1].view(-1, T), window[1:].view(-1, T)
    model = t.model.eval()
    with torch.no_grad():
        ce = F.cross_entropy(model(x)[0].flatten(0, 1).float(), y.flatten())
    want = ce.item() / math.log(2) * n_tokens / n_bytes
    assert row["bpb"] == pytest.approx(want, rel=1e-5)
    assert row.get("loss_all", row["loss"]) == pytest.approx(ce.item(), rel=1e-5)


# ---- the mutant list stays in step with the code ------------------------------------------------------------

def test_every_mutant_still_finds_its_code():
    result = subprocess.run([sys.executable, str(REPO / "tests" / "mutants.py"), "--check"], cwd=REPO,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
