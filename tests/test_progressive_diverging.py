"""Progressive diverging model: stages, LoRA, function-preserving switches, caches, checkpoints, training."""

import dataclasses
import io
import json
import os
import signal

import pytest
import torch
import torch.nn as nn

from checkpoint import load_model
from components import LoRALinear
from conftest import run_script, train_args
from models import ModelConfigError, create_model
from models.progressive_diverging import LoRAProjection, _LoRAMatmul

VOCAB = 64
SMALL = dict(vocab_size=VOCAB, block_size=32, n_layer=12, n_head=2, n_embd=32)
ATTN_BASE = ("attn.c_attn.base.", "attn.c_proj.base.")


def lora_layers(model):
    return [m for m in model.modules() if isinstance(m, LoRALinear)]


@torch.no_grad()
def pretend_trained(model, seed):
    """Give every LoRA a non-zero B (fresh ones have B = 0, which would hide bugs) and move the MLPs a bit."""
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        if name.endswith("lora_B") or ".mlp." in name:
            p.add_(0.05 * torch.randn(p.shape, generator=g))


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """These models are tiny: a second thread only waits for the first (and crawls on a busy machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def make(stage, seed=0):
    """A small 12-application model in `stage`, trained-looking at every stage it went through."""
    torch.manual_seed(seed)
    model = create_model("progressive_diverging", preset=None, **SMALL)
    for s in range(2, stage + 1):
        model.set_stage(s)
        pretend_trained(model, seed + s)
    return model.eval()


def tokens(shape, seed=1):
    return torch.randint(0, VOCAB, shape, generator=torch.Generator().manual_seed(seed))


# ---- structure --------------------------------------------------------------------------------

def test_stage_structure():
    model = create_model("progressive_diverging", preset="rtx3080")
    c = model.config
    assert (c.n_layer, c.n_head, c.n_embd, c.block_size, c.lora_rank, c.lora_alpha) == (12, 6, 192, 256, 8, 16)
    assert model.stage == 1 and len(model.blocks) == 3 and not lora_layers(model)
    for stage, n_blocks in ((2, 6), (3, 12)):
        model.set_stage(stage)
        assert model.stage == stage and len(model.blocks) == n_blocks and model.log_fields() == {"stage": stage}
        for block in model.blocks:
            assert isinstance(block.attn.c_attn, LoRALinear) and isinstance(block.attn.c_proj, LoRALinear)
            assert block.attn.c_attn.r == 8 and block.attn.c_attn.scale == 2.0
            assert type(block.mlp.c_fc) is nn.Linear and type(block.mlp.c_proj) is nn.Linear
    # every block is its own module: nothing is shared by reference once the stages diverged
    assert len({id(p) for p in model.parameters()}) == len(list(model.parameters()))


def test_bad_sizes_and_stage_order():
    with pytest.raises(ModelConfigError, match="multiple of 4"):
        create_model("progressive_diverging", preset="tiny", n_layer=6)
    with pytest.raises(ModelConfigError, match="stage2_at"):
        create_model("progressive_diverging", preset="tiny", stage2_at=0.8, stage3_at=0.5)
    model = make(2)
    with pytest.raises(ValueError, match="only go up"):
        model.set_stage(1)
    model.set_stage(2)  # staying is allowed and changes nothing
    assert model.stage == 2


def test_on_train_step_switches_at_the_fractions():
    model = create_model("progressive_diverging", preset=None, **SMALL)
    stages, switched = [], []
    for step in range(9):
        switched.append(model.on_train_step(step, 9))
        stages.append(model.log_fields()["stage"])
    assert stages == [1, 1, 1, 2, 2, 2, 3, 3, 3]
    assert [s for s, sw in enumerate(switched) if sw] == [3, 6]
    model = create_model("progressive_diverging", preset=None, **SMALL)
    assert [model.stage_at(s, 200) for s in (66, 67, 132, 133)] == [1, 2, 2, 3]


# ---- LoRA ---------------------------------------------------------------------------------------

def test_lora_projection_is_components_lora():
    torch.manual_seed(0)
    ref = LoRALinear(nn.Linear(24, 40), r=4, alpha=8)
    fast = LoRAProjection(nn.Linear(24, 40), r=4, alpha=8)
    fast.load_state_dict(ref.state_dict())
    with torch.no_grad():
        ref.lora_B.normal_()
        fast.lora_B.copy_(ref.lora_B)
    x = torch.randn(3, 5, 24, requires_grad=True)
    y_ref, y_fast = ref(x), fast(x)
    torch.testing.assert_close(y_fast, y_ref, rtol=1e-5, atol=1e-5)
    # and it is the low-rank update of W, not something else
    manual = x @ (ref.base.weight + 2.0 * ref.lora_B @ ref.lora_A).t() + ref.base.bias
    torch.testing.assert_close(y_fast, manual, rtol=1e-5, atol=1e-5)
    g = torch.randn_like(y_ref)
    for a, b in zip(torch.autograd.grad(y_ref, (x, ref.lora_A, ref.lora_B), g),
                    torch.autograd.grad(y_fast, (x, fast.lora_A, fast.lora_B), g)):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-4)
    # under autocast (bf16 on CUDA in the trainer) it computes in the autocast dtype, as nn.Linear would
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y_ref, y_fast = ref(x), fast(x)
    assert y_fast.dtype == torch.bfloat16
    torch.testing.assert_close(y_fast.float(), y_ref.float(), rtol=0.02, atol=0.02)
    y_fast.float().sum().backward()
    assert fast.lora_A.grad.dtype == fast.lora_B.grad.dtype == torch.float32 and x.grad.dtype == torch.float32
    W, b = torch.randn(10, 6, dtype=torch.double), torch.randn(10, dtype=torch.double)
    A = torch.randn(3, 6, dtype=torch.double, requires_grad=True)
    B = torch.randn(10, 3, dtype=torch.double, requires_grad=True)
    x = torch.randn(7, 6, dtype=torch.double, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, A, B: _LoRAMatmul.apply(x, W, b, A, B, 1.5), (x, A, B))


# ---- function preserved, leak-free, merge, cache --------------------------------------------------

@pytest.mark.parametrize("stage", [1, 2])
def test_stage_switch_preserves_the_function(stage):
    model = make(stage)
    idx = tokens((2, 32))
    with torch.no_grad():
        before = model(idx)[0]
        old_blocks = list(model.blocks)
        model.set_stage(stage + 1)
        after = model(idx)[0]
    torch.testing.assert_close(after, before, rtol=0, atol=1e-5)
    for i, block in enumerate(model.blocks):  # block i starts as a copy of block i // 2
        old = old_blocks[i // 2]
        assert torch.equal(block.mlp.c_fc.weight, old.mlp.c_fc.weight)
        assert block.mlp.c_fc.weight is not old.mlp.c_fc.weight
        want = old.attn.c_attn.merged().weight if stage == 2 else old.attn.c_attn.weight
        assert torch.equal(block.attn.c_attn.base.weight, want)  # stage 3: stage-2 LoRA merged into W
        assert not block.attn.c_attn.lora_B.any()                # fresh LoRA: B = 0


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_leak_free_in_every_stage(stage):
    model = make(stage)
    T = 32
    g = torch.Generator().manual_seed(3)
    idx = tokens((2, T))
    with torch.no_grad():
        base = model(idx)[0]
        for j in range(1, T):
            changed = idx.clone()
            changed[:, j:] = torch.randint(0, VOCAB, (2, T - j), generator=g)
            out = model(changed)[0]
            torch.testing.assert_close(out[:, :j], base[:, :j], rtol=0, atol=1e-5,
                                       msg=f"stage {stage}: a position < {j} saw the future")
            assert not torch.allclose(out[:, j:], base[:, j:])


@pytest.mark.parametrize("stage", [2, 3])
def test_merged_equals_unmerged(stage):
    model = make(stage)
    idx = tokens((2, 32))
    with torch.no_grad():
        before = model(idx)[0]
        model.prepare_for_inference()
        after = model(idx)[0]
    assert not lora_layers(model) and model.extra_state() == {"stage": stage, "merged": True}
    torch.testing.assert_close(after, before, rtol=0, atol=1e-5)


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_cache_matches_full_forward_and_greedy_generation(stage):
    model = make(stage)
    idx = tokens((2, 20))
    with torch.no_grad():
        full = model(idx)[0]
        cache = model.new_cache(2, "cpu", torch.float32)
        assert cache.k.size(0) == 12  # one slot per layer application, shared blocks included
        parts = [model.forward_cached(idx[:, :7], cache)]
        parts += [model.forward_cached(idx[:, t:t + 1], cache) for t in range(7, 20)]
    torch.testing.assert_close(torch.cat(parts, dim=1), full, rtol=1e-5, atol=1e-5)
    prompt = tokens((2, 5), seed=2)
    n_new = model.config.block_size + 6  # also slides the context window
    cached = model.generate(prompt, n_new, top_k=1, use_cache=True)
    assert torch.equal(cached, model.generate(prompt, n_new, top_k=1, use_cache=False))


# ---- what trains --------------------------------------------------------------------------------

def adamw(model):
    """As base_trainer.build_optimizer: exactly the parameters that require grad (weight decay 0 here,
    so a parameter can only move through its gradient)."""
    return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.0)


def train_step(model, opt, idx):
    opt.zero_grad(set_to_none=True)
    model(idx, idx.roll(-1, dims=1))[1].backward()
    opt.step()


def test_after_a_switch_the_right_parameters_train():
    torch.manual_seed(0)
    model = create_model("progressive_diverging", preset=None, **SMALL).train()
    idx = tokens((4, 32))
    opt = adamw(model)
    for step, stage in ((0, 1), (2, 2), (4, 3)):  # max_steps 6: stage 2 from step 2, stage 3 from step 4
        switched = model.on_train_step(step, 6)
        assert switched == (stage > 1) and model.stage == stage
        if switched:
            opt = adamw(model)
        frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
        if stage == 1:
            assert not frozen
        else:  # exactly the attention projections' base weights and biases are frozen
            assert frozen == {n for n, _ in model.named_parameters() if any(k in n for k in ATTN_BASE)}
            assert len(frozen) == 4 * len(model.blocks)
        in_opt = {id(p) for group in opt.param_groups for p in group["params"]}
        assert in_opt == {id(p) for p in model.parameters() if p.requires_grad}
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        # two steps: lora_A gets a gradient only once lora_B is no longer zero
        train_step(model, opt, idx)
        train_step(model, opt, idx)
        for n, p in model.named_parameters():
            moved = not torch.equal(p, before[n])
            assert moved == p.requires_grad, f"stage {stage}: {n} moved={moved}"


def test_copied_parameters_start_with_their_sources_adam_state():
    from optim import carry_optimizer_state
    torch.manual_seed(0)
    model = create_model("progressive_diverging", preset=None, **SMALL).train()
    idx = tokens((4, 32))
    opt = adamw(model)
    train_step(model, opt, idx)
    train_step(model, opt, idx)
    sources = dict(model.blocks.named_parameters())
    model.set_stage(2)
    new = adamw(model)
    carry_optimizer_state(opt, new, model.parameter_origins)
    copied = 0
    for name, p in model.blocks.named_parameters():
        if not p.requires_grad or "lora_" in name:
            assert p not in new.state  # frozen, or a fresh LoRA: nothing to inherit
            continue
        i, rest = name.split(".", 1)
        source = sources[f"{int(i) // 2}.{rest}"]  # stage-2 block i is a copy of stage-1 block i // 2
        for key in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(new.state[p][key], opt.state[source][key])
            assert new.state[p][key] is not opt.state[source][key]  # its own tensor: two copies, two updates
        copied += 1
    assert copied == 2 * sum(1 for n in sources if ".attn." not in n)  # LayerNorms and MLPs, twice each
    for p in model.parameters():  # the parameters outside the blocks keep their own state
        if p.requires_grad and not any(p is q for q in model.blocks.parameters()):
            assert p in new.state and new.state[p] is opt.state[p]
    train_step(model, new, idx)  # and training goes on with it


# ---- checkpoints ----------------------------------------------------------------------------------

@pytest.mark.parametrize("stage,merged", [(2, False), (3, False), (3, True)])
def test_checkpoint_round_trip(stage, merged):
    model = make(stage)
    if merged:
        model.prepare_for_inference()
    buf = io.BytesIO()
    torch.save({"extra": model.extra_state(), "state": model.state_dict(),
                "config": dataclasses.asdict(model.config)}, buf)
    buf.seek(0)
    saved = torch.load(buf, weights_only=True)
    fresh = create_model("progressive_diverging", preset=None, **saved["config"])
    fresh.load_extra_state(saved["extra"])
    fresh.load_state_dict(saved["state"])  # strict: the structure matches key for key
    assert fresh.stage == stage and fresh.extra_state() == model.extra_state()
    assert ({n for n, p in fresh.named_parameters() if p.requires_grad}
            == {n for n, p in model.named_parameters() if p.requires_grad})
    idx = tokens((2, 32))
    with torch.no_grad():
        assert torch.equal(fresh.eval()(idx)[0], model(idx)[0])


# ---- the trainer, end to end -----------------------------------------------------------------------

STEPS = 12  # stage 2 from step 4, stage 3 from step 8
RUN = ("--max-steps", STEPS, "--eval-interval", 4, "--checkpoint-interval", 3, "--warmup-steps", 3,
       "--micro-batch-size", 8, "--seq-len", 64, "--total-batch-size", 512, "--n-embd", 64, "--n-head", 2)


def train(data_dir, out, *extra, fault=None):
    """train_progressive_diverging.py; with fault (e.g. "kill_after_step:5") run through tests/fault_run.py."""
    script = ("tests/fault_run.py", fault, "train_progressive_diverging.py") if fault else \
        ("train_progressive_diverging.py",)
    return run_script(*script, *train_args(data_dir, out, *RUN, *extra), env={"OMP_NUM_THREADS": "1"})


def metrics(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def column(rows, split, *keys):
    return [tuple(r[k] for k in ("step",) + keys) for r in rows if r["split"] == split]


@pytest.fixture(scope="module")
def reference_run(data_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "progressive"
    result = train(data_dir, out)
    assert result.returncode == 0, result.stderr
    return out


def test_tiny_run_goes_through_the_three_stages(reference_run):
    rows = metrics(reference_run)
    train = column(rows, "train", "stage", "loss")
    assert [stage for _, stage, _ in train] == [1] * 4 + [2] * 4 + [3] * 4
    assert column(rows, "val", "stage") == [(0, 1), (4, 1), (8, 2), (12, 3)]  # val at 4 runs before the switch
    losses = [loss for _, _, loss in train]
    assert sum(losses[-3:]) / 3 < 0.8 * losses[0], losses
    model, ckpt = load_model(str(reference_run / "checkpoint.pt"))
    assert ckpt["model_extra_state"] == {"stage": 3} and not lora_layers(model)  # merged for inference


@pytest.mark.parametrize("kill_after", [5, 7])  # last checkpoint at step 3 (stage 1) / 6 (stage 2)
def test_kill_and_resume_across_a_stage_boundary(reference_run, data_dir, tmp_path, kill_after):
    out = tmp_path / "run"
    killed = train(data_dir, out, fault=f"kill_after_step:{kill_after}")
    assert killed.returncode == -signal.SIGKILL
    saved = torch.load(out / "checkpoint.pt", weights_only=True)
    assert (saved["step"], saved["model_extra_state"]) == ((3, {"stage": 1}) if kill_after == 5
                                                           else (6, {"stage": 2}))
    resumed = train(data_dir, out, "--resume")
    assert resumed.returncode == 0, resumed.stderr
    got, want = metrics(out), metrics(reference_run)
    for split in ("train", "val", "test"):
        assert column(got, split, "stage", "loss") == column(want, split, "stage", "loss"), split
