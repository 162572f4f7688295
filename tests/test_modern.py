"""The modern switches (rotary positions, RMSNorm, ReLU^2 / SwiGLU, QK-norm, zero-initialised output
projections) in every model, and the Muon optimizer (optim.py): leak-free, cached generation, parameter groups,
state carry-over at progressive_diverging's stage switches, exact resume, checkpoints, DDP.
(pos=rope is also in the pos x head tables of test_models_contract.py.)"""

import json
import signal

import pytest
import torch
import torch.nn as nn

import optim
from checkpoint import load_model
from components import MLP, SelfAttention, apply_rotary
from conftest import run_script, run_torchrun, train_args
from models import MODELS, ModelConfigError, create_model, model_module
from test_models_contract import VOCAB, assert_leak_free

ALL = dict(pos="rope", norm="rms", mlp="swiglu", qk_norm=True, zero_init_proj=True)
SWITCHES = [dict(norm="rms"), dict(mlp="relu2"), dict(mlp="swiglu"), dict(qk_norm=True), dict(zero_init_proj=True), ALL]


def modern(name, **options):
    """A tiny model with `options`; zero-initialised projections get random weights, as after training, so that
    the leak and cache tests see attention that does something."""
    torch.manual_seed(0)
    model = create_model(name, preset="tiny", vocab_size=VOCAB, **options).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2 and not p.any():
                p.normal_(0, 0.02)
    return model


@pytest.mark.parametrize("options", SWITCHES, ids=lambda o: "+".join(f"{k}={v}" for k, v in o.items()))
@pytest.mark.parametrize("name", list(MODELS))
def test_every_switch_is_leak_free(name, options):
    model = modern(name, **options)
    assert_leak_free(model)
    if name == "progressive_diverging" and options == ALL:
        model.set_stage(3)
        assert_leak_free(model)


@pytest.mark.parametrize("name", [n for n in MODELS if model_module(n).Model.supports_kv_cache])
def test_rope_cached_generation_equals_uncached(name):
    model = modern(name, **ALL, block_size=24)
    prompt = torch.randint(0, VOCAB - 8, (2, 5), generator=torch.Generator().manual_seed(2))
    cached = model.generate(prompt, 30, top_k=1, use_cache=True)      # crosses the window's end: cache refilled
    assert torch.equal(cached, model.generate(prompt, 30, top_k=1, use_cache=False))
    full = model(cached[:, :24])[0]
    cache = model.new_cache(2, "cpu", torch.float32)
    steps = [model.forward_cached(cached[:, :10], cache)] + [model.forward_cached(cached[:, t:t + 1], cache)
                                                             for t in range(10, 24)]
    torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=1e-4, atol=1e-4)


def test_rotary_scores_depend_on_the_distance_only():
    torch.manual_seed(0)
    q, k = torch.randn(1, 2, 6, 8), torch.randn(1, 2, 6, 8)
    pos = torch.arange(6)
    scores = apply_rotary(q, pos) @ apply_rotary(k, pos).transpose(-1, -2)
    shifted = apply_rotary(q, pos + 37) @ apply_rotary(k, pos + 37).transpose(-1, -2)
    torch.testing.assert_close(scores, shifted, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(scores, q @ k.transpose(-1, -2), atol=1e-3)            # it does rotate
    torch.testing.assert_close(apply_rotary(q, pos).norm(dim=-1), q.norm(dim=-1))    # a rotation
    torch.testing.assert_close(apply_rotary(q, pos[None].expand(3, 6)), apply_rotary(q, pos).expand(3, 2, 6, 8))


@pytest.mark.parametrize("name", list(MODELS))
def test_rope_has_no_position_table_and_runs_past_block_size(name):
    model = modern(name, pos="rope", block_size=16)
    assert not any("wpe" in n for n, _ in model.named_parameters())
    idx = torch.randint(0, VOCAB - 8, (1, 64))
    with torch.no_grad():
        long = model(idx)[0]
        assert long.shape == (1, 64, VOCAB) and torch.isfinite(long).all()
        torch.testing.assert_close(long[:, :16], model(idx[:, :16])[0])            # causal: a prefix is a prefix


def test_dual_mask_bw_is_the_mirror_of_fw_with_rope():
    model = modern("dual_mask_gpt", **ALL)
    with torch.no_grad():
        model.wte.weight[VOCAB - 1] = model.wte.weight[VOCAB - 2]                 # BW = FW: only positions differ
        idx = torch.randint(0, VOCAB - 2, (2, 40))
        bw = model(idx, direction="bw")[0]
        torch.testing.assert_close(bw, model(idx.flip(1), direction="fw")[0].flip(1), rtol=1e-4, atol=1e-4)


def test_rope_needs_an_even_head_size_and_unknown_switches_are_clear_errors():
    with pytest.raises(ModelConfigError, match="must be even"):
        create_model("baseline_gpt2", n_embd=12, n_head=4, pos="rope")
    with pytest.raises(ModelConfigError, match="norm 'batch' unknown"):
        create_model("baseline_gpt2", norm="batch")
    with pytest.raises(ModelConfigError, match="mlp 'geglu' unknown"):
        create_model("conv_attention", mlp="geglu")
    with pytest.raises(ModelConfigError, match="qk_norm must be true or false"):
        create_model("dual_mask_gpt", qk_norm="yes")


@pytest.mark.parametrize("name", list(MODELS))
def test_switches_build_what_they_say(name):
    plain, new = modern(name), create_model(name, preset="tiny", vocab_size=VOCAB, **ALL)
    kinds = {type(m) for m in new.modules()}
    assert nn.LayerNorm not in kinds and nn.RMSNorm in kinds and nn.LayerNorm in {type(m) for m in plain.modules()}
    assert all(m.kind == "swiglu" for m in new.modules() if isinstance(m, MLP))
    attns = [m for m in new.modules() if isinstance(m, SelfAttention)]
    assert attns and all(a.rope and isinstance(a.q_norm, nn.RMSNorm) for a in attns)
    residual = [m for m in new.modules() if getattr(m, "RESIDUAL_SCALE_INIT", False)]
    assert residual and all(not m.weight.any() for m in residual)                   # zero-initialised
    assert all(m.weight.any() for m in plain.modules() if getattr(m, "RESIDUAL_SCALE_INIT", False))
    # SwiGLU keeps the parameter count (2/3 of the hidden width, three matrices instead of two)
    gelu, swiglu = (create_model(name, preset="tiny", vocab_size=VOCAB, mlp=m).num_params() for m in ("gelu", "swiglu"))
    assert abs(swiglu - gelu) / gelu < 0.02


def test_mlp_variants_compute_their_formulas():
    torch.manual_seed(0)
    x = torch.randn(3, 16)
    relu2 = MLP(16, kind="relu2")
    torch.testing.assert_close(relu2(x), relu2.c_proj(torch.relu(relu2.c_fc(x)) ** 2))
    swiglu = MLP(16, kind="swiglu")
    assert swiglu.c_proj.in_features == 40                                          # 2/3 * 64 = 42.7 -> 40
    gate, up = swiglu.c_fc(x).split(40, dim=-1)
    torch.testing.assert_close(swiglu(x), swiglu.c_proj(torch.nn.functional.silu(gate) * up))


def test_qk_norm_makes_attention_blind_to_the_scale_of_q_and_k():
    torch.manual_seed(0)
    x = torch.randn(2, 7, 16)
    for qk_norm in (True, False):
        attn = SelfAttention(16, 2, qk_norm=qk_norm).eval()
        base = attn(x)
        with torch.no_grad():
            attn.c_attn.weight[:32] *= 9.0                                       # q and k rows
            attn.c_attn.bias[:32] *= 9.0
        same = torch.allclose(attn(x), base, atol=1e-4)
        assert same == qk_norm, f"qk_norm={qk_norm}"


# ---- Muon ------------------------------------------------------------------------------------------

CFG = dict(optimizer="muon", lr=3e-3, weight_decay=0.1, muon_lr=0.02, muon_momentum=0.95, muon_weight_decay=0.0)


def groups(opt):
    kinds = {type(o).__name__: {id(p) for g in o.param_groups for p in g["params"]} for o in optim.parts(opt)}
    return kinds.get("Muon", set()), kinds["AdamW"]


@pytest.mark.parametrize("name", list(MODELS))
def test_muon_takes_the_hidden_matrices_and_adamw_the_rest(name):
    model = create_model(name, preset="tiny", vocab_size=VOCAB, **ALL)
    muon, adamw = groups(optim.build_optimizer(model, CFG))
    names = {id(p): n for n, p in model.named_parameters()}
    assert muon.isdisjoint(adamw) and muon | adamw == set(names)                  # every parameter, once
    want = {n for n in names.values() if n.endswith(("c_attn.weight", "c_proj.weight", "c_fc.weight", "proj.weight"))}
    assert {names[i] for i in muon} == want and want
    assert "wte.weight" in {names[i] for i in adamw}                             # embedding = tied head: AdamW
    assert all(p.dim() == 2 for p in model.parameters() if id(p) in muon)
    assert groups(optim.build_optimizer(model, dict(CFG, optimizer="adamw"))) == (set(), set(names))


def test_muon_in_progressive_stages_skips_frozen_weights_and_lora_and_carries_momentum():
    torch.manual_seed(0)
    model = create_model("progressive_diverging", preset=None, vocab_size=VOCAB, n_layer=4, n_head=2, n_embd=32,
                         block_size=32, **ALL).train()
    opt = optim.build_optimizer(model, CFG)
    idx = torch.randint(0, VOCAB, (2, 32))
    for _ in range(2):
        opt.zero_grad()
        model(idx, idx)[1].backward()
        opt.step()
    model.set_stage(2)
    new = optim.build_optimizer(model, CFG)
    optim.carry_optimizer_state(opt, new, model.parameter_origins)
    muon_opt, adam_opt = new.optimizers["muon"], new.optimizers["adamw"]
    muon, adamw = groups(new)
    for name, p in model.named_parameters():
        if not p.requires_grad:
            assert id(p) not in muon | adamw, name                                # frozen attention weights
        elif "lora_" in name:
            assert id(p) in adamw and p not in adam_opt.state, name               # fresh LoRA: AdamW, no history
        elif name.endswith("mlp.c_fc.weight"):
            assert id(p) in muon, name
            source = model.parameter_origins[p]
            got, want = muon_opt.state[p]["momentum_buffer"], opt.optimizers["muon"].state[source]["momentum_buffer"]
            assert torch.equal(got, want) and got is not want and got.any()       # a copy of its source's
        elif name == "wte.weight":
            assert adam_opt.state[p] is opt.optimizers["adamw"].state[p]          # stays: keeps its own


# A model small enough for seconds; 3 stages in 9 steps (switches before steps 3 and 6).
SMALL = ("--n-layer", 4, "--n-head", 2, "--n-embd", 32, "--micro-batch-size", 2, "--seq-len", 32,
         "--total-batch-size", 128, "--max-steps", 9, "--eval-interval", 4, "--checkpoint-interval", 4)


def losses(run_dir, split):
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"]) for r in rows if r["split"] == split]


def test_modern_recipe_with_muon_resumes_exactly_across_stage_switches(data_dir, tmp_path):
    """progressive_diverging --recipe modern, killed after step 5 (checkpoint at 4, stage 2), resumed: the same
    losses and bit-identical final weights and optimizer state as the uninterrupted run."""
    args = lambda out: train_args(data_dir, out, *SMALL, "--recipe", "modern")  # noqa: E731
    ref = run_script("train_progressive_diverging.py", *args(tmp_path / "ref"))
    assert ref.returncode == 0, ref.stderr
    killed = run_script("tests/fault_run.py", "kill_after_step:5", "train_progressive_diverging.py",
                        *args(tmp_path / "run"))
    assert killed.returncode == -signal.SIGKILL
    resumed = run_script("train_progressive_diverging.py", *train_args(data_dir, tmp_path / "run", "--resume"))
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming at step 4" in resumed.stdout
    for split in ("train", "val", "test"):
        assert losses(tmp_path / "run", split) == losses(tmp_path / "ref", split)
    want = torch.load(tmp_path / "ref" / "checkpoint.pt", weights_only=True)
    got = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)
    assert got["model_extra_state"]["stage"] == 3 and set(got["optimizer_state"]) == {"muon", "adamw"}
    for k, v in want["model_state"].items():
        assert torch.equal(got["model_state"][k], v), k
    for part in ("muon", "adamw"):
        for i, s in want["optimizer_state"][part]["state"].items():
            for k, v in s.items():
                assert torch.equal(got["optimizer_state"][part]["state"][i][k], v), (part, i, k)
    # Muon's lr followed the schedule, scaled by muon_lr / lr
    last_lr = [json.loads(r) for r in (tmp_path / "ref" / "metrics.jsonl").read_text().splitlines()][-3]["lr"]
    muon_group = want["optimizer_state"]["muon"]["param_groups"][0]
    assert muon_group["lr_scale"] == pytest.approx(0.02 / 3e-3)
    assert muon_group["lr"] == pytest.approx(last_lr * 0.02 / 3e-3)


def test_options_survive_the_checkpoint_and_resume_refuses_changes(data_dir, tmp_path):
    out = tmp_path / "run"
    result = run_script("train_baseline_gpt2.py", *train_args(data_dir, out, *SMALL[:-6], "--max-steps", 2,
                                                               "--recipe", "modern", "--mlp", "swiglu"))
    assert result.returncode == 0, result.stderr
    model, ckpt = load_model(str(out / "checkpoint.pt"))
    c = model.config
    assert (c.pos, c.norm, c.mlp, c.qk_norm, c.zero_init_proj) == ("rope", "rms", "swiglu", True, True)  # typed wins
    assert ckpt["config"]["optimizer"] == "muon" and ckpt["config"]["recipe"] == "modern"
    assert isinstance(model.ln_f, nn.RMSNorm) and model.blocks[0].attn.q_norm.weight.requires_grad
    # --resume refuses a changed switch or optimizer setting (checked before any work: in-process here)
    from base_trainer import BaseTrainer, TrainError, resolve_config
    for flags in (("--optimizer", "adamw"), ("--qk-norm", "false"), ("--muon-lr", "0.05"), ("--recipe", "gpt2")):
        cfg, typed = resolve_config("baseline_gpt2", [str(a) for a in train_args(data_dir, out, "--resume", *flags)])
        with pytest.raises(TrainError, match="differs from the run being resumed"):
            BaseTrainer("baseline_gpt2", cfg, typed)
    with pytest.raises(SystemExit):
        resolve_config("baseline_gpt2", ["--optimizer", "sgd"])


def test_muon_two_processes_match_one(data_dir, tmp_path):
    """torchrun with 2 CPU processes (gloo): Muon steps on the all-reduced gradients, same losses as 1 process."""
    args = (*SMALL[:-6], "--max-steps", 3, "--eval-interval", 2, "--optimizer", "muon")
    one = run_script("train_baseline_gpt2.py", *train_args(data_dir, tmp_path / "one", *args))
    assert one.returncode == 0, one.stderr
    two = run_torchrun("train_baseline_gpt2.py", *train_args(data_dir, tmp_path / "two", *args))
    assert two.returncode == 0, two.stderr[-2000:]
    for split in ("train", "val"):
        a, b = losses(tmp_path / "one", split), losses(tmp_path / "two", split)
        assert [s for s, _ in a] == [s for s, _ in b] and len(a) > 0
        for (_, x), (_, y) in zip(a, b):
            assert abs(x - y) < 1e-3 * max(1.0, abs(x)), f"{split}: {x} vs {y}"


def test_bench_smoke(data_dir, tmp_path):
    from conftest import TINY_TOKENS
    result = run_script("bench/modern.py", "--smoke", "--seeds", "1", "--data-dir", data_dir,
                        "--max-tokens", TINY_TOKENS, "--out-dir", tmp_path / "bench", timeout=180)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [line for line in result.stdout.splitlines() if line.startswith("| baseline_gpt2 |")]
    assert [r.split("|")[2].strip() for r in rows] == ["gpt2", "modern"], result.stdout
    assert rows[0].endswith("| 1.00 |") and rows[1].count("±") == 2 and "| 1 |" in rows[1]
    saved = json.loads((tmp_path / "bench" / "results.json").read_text())
    assert len(saved["results"]["baseline_gpt2|modern"]) == 1                  # one seed
    cfg = json.loads((tmp_path / "bench" / "baseline_gpt2-modern-seed1" / "config.json").read_text())
    assert cfg["optimizer"] == "muon" and cfg["model_config"]["pos"] == "rope"
