"""Dual-mask GPT: leak-freeness in both directions (and the seed's mask caught leaking), task tokens and
positions, the p_bw coin, dynamic p_bw, layer cuts, the two ratio averages, and a tiny training run."""

import json
import math
import os

import numpy as np
import pytest
import torch

import components
from dual_mask.analyze import mean_then_ratio, ratio_then_mean, ratio1_samples
from models import ModelConfigError, create_model
from models import dual_mask_gpt as dm

V, T = 70, 24


def tiny(**kw):
    torch.manual_seed(0)
    cfg = dict(vocab_size=V, block_size=T, n_layer=2, n_head=2, n_embd=32)
    cfg.update(kw)
    return create_model("dual_mask_gpt", preset="tiny", **cfg).eval()


def leaks(model, direction, js=range(T - 1), trials=3):
    """Positions j for which perturbing the tokens that must not matter changes a logit that must not move.
    fw: perturb positions > j, check logits <= j.  bw: perturb positions <= j, check logits > j."""
    g = torch.Generator().manual_seed(1)
    idx = torch.randint(0, V - 2, (2, T), generator=g)
    with torch.no_grad():
        ref, _ = model(idx, direction=direction)
        bad = []
        for j in js:
            for _ in range(trials):
                other = idx.clone()
                if direction == "fw":
                    other[:, j + 1:] = torch.randint(0, V - 2, (2, T - j - 1), generator=g)
                    keep = slice(0, j + 1)
                else:
                    other[:, :j + 1] = torch.randint(0, V - 2, (2, j + 1), generator=g)
                    keep = slice(j + 1, T)
                out, _ = model(other, direction=direction)
                if not torch.allclose(out[:, keep], ref[:, keep], atol=1e-5, rtol=0):
                    bad.append(j)
                    break
    return bad


def test_fw_is_leak_free():
    assert leaks(tiny(), "fw") == []


def test_bw_is_leak_free():
    assert leaks(tiny(), "bw") == []


def test_leak_check_detects_a_real_dependence():
    """The check is not vacuous: fw logits do move when the past changes, bw ones when the future does."""
    m, idx = tiny(), torch.randint(0, V - 2, (1, T))
    other = idx.clone()
    other[:, 5] = (idx[:, 5] + 1) % (V - 2)
    with torch.no_grad():
        assert not torch.allclose(m(idx, direction="fw")[0][:, 5:], m(other, direction="fw")[0][:, 5:])
        assert not torch.allclose(m(idx, direction="bw")[0][:, :6], m(other, direction="bw")[0][:, :6])


@pytest.fixture
def seed_backward_mask(monkeypatch):
    """The seed's "backward causal mask" tril(ones).flip(0) in place of the anti-causal one."""
    original = components.attention_mask

    def patched(kind, T_q, T_k, device, q_start=0):
        if kind == "anticausal":
            return torch.tril(torch.ones(T_q, T_k, dtype=torch.bool, device=device)).flip(0)
        return original(kind, T_q, T_k, device, q_start)

    monkeypatch.setattr(components, "attention_mask", patched)


def test_seed_flip_mask_fails_the_bw_check(seed_backward_mask):
    bad = leaks(tiny(), "bw")
    assert len(bad) > T // 2, f"the seed's mask should leak at most positions, leaked at {bad}"


def test_anticausal_mask_is_triu():
    mask = components.attention_mask("anticausal", 6, 6, "cpu")
    assert torch.equal(mask, torch.triu(torch.ones(6, 6, dtype=torch.bool)))
    assert not torch.equal(mask, torch.tril(torch.ones(6, 6, dtype=torch.bool)).flip(0))


def test_task_tokens_and_positions():
    m = tiny()
    assert dm.EXTRA_TOKENS == 2 and (m.fw_token, m.bw_token) == (V - 2, V - 1)
    seen = {}
    m.wte.register_forward_hook(lambda mod, inp, out: seen.__setitem__("tok", inp[0].clone()))
    m.wpe.register_forward_hook(lambda mod, inp, out: seen.__setitem__("pos", inp[0].clone()))
    idx = torch.randint(0, V - 2, (3, 10))
    with torch.no_grad():
        logits, _ = m(idx, direction="fw")
        assert logits.shape == (3, 10, V)
        assert (seen["tok"][:, 0] == V - 2).all() and torch.equal(seen["tok"][:, 1:], idx)
        assert seen["pos"].tolist() == list(range(11))
        logits, _ = m(idx, direction="bw")
        assert logits.shape == (3, 10, V)
        assert (seen["tok"][:, -1] == V - 1).all() and torch.equal(seen["tok"][:, :-1], idx)
        assert seen["pos"].tolist() == list(range(10, -1, -1))
    # the whole block_size of text fits (the task token is the extra slot); one more does not
    with torch.no_grad():
        assert m(torch.zeros(1, T, dtype=torch.long), direction="bw")[0].shape == (1, T, V)
    with pytest.raises(AssertionError):
        m(torch.zeros(1, T + 1, dtype=torch.long))


def test_bw_is_the_mirror_of_fw():
    """With FW and BW sharing one embedding, bw on x equals fw on reversed x, reversed: the positions mirror."""
    m = tiny()
    with torch.no_grad():
        m.wte.weight[V - 1] = m.wte.weight[V - 2]
        idx = torch.randint(0, V - 2, (2, T))
        bw, _ = m(idx, direction="bw")
        fw, _ = m(idx.flip(1), direction="fw")
    assert torch.allclose(bw, fw.flip(1), atol=1e-5)


def test_bw_batch_targets_are_previous_tokens():
    z = torch.arange(10).view(1, 10)
    x, y = z[:, :-1], z[:, 1:]
    inp, tgt, mask = dm.Model.bw_batch(x, y, torch.ones_like(x))
    assert torch.equal(inp, y) and torch.equal(tgt, inp - 1) and mask.shape == x.shape


def test_kv_cache_generation_matches_uncached():
    m = tiny()
    idx = torch.randint(0, V - 2, (2, 4))
    assert torch.equal(m.generate(idx, 30, top_k=1, use_cache=True), m.generate(idx, 30, top_k=1, use_cache=False))


def count_bw_calls(model, steps):
    """Run training_loss for each step and record which directions the network was called with."""
    calls = []
    orig = model.features  # training runs features() and the chunked head, not forward()

    def spy(idx, direction="fw", key_mask=None, cache=None):
        calls[-1].append(direction)
        return orig(idx, direction, key_mask, cache)

    model.features = spy
    x = torch.randint(0, V - 2, (2, 8))
    for s in steps:
        calls.append([])
        loss, metrics = model.training_loss(x, x, None, s)
        assert metrics["bw_ran"] == float("bw" in calls[-1])
    return calls


@pytest.mark.parametrize("mode", ["additional", "exclusive"])
def test_p_bw_zero_never_runs_bw(mode):
    m = tiny(p_bw=0.0, bw_mode=mode)
    assert all(c == ["fw"] for c in count_bw_calls(m, range(40)))
    assert all(m.directions_for_step(s) == ("fw",) for s in range(20000))


@pytest.mark.parametrize("mode,p", [("additional", 0.05), ("exclusive", 0.05), ("additional", 0.3),
                                    ("exclusive", 0.5)])
def test_bw_rate_matches_p_bw(mode, p):
    m = tiny(p_bw=p, bw_mode=mode, bw_seed=7)
    n = 20000
    dirs = [m.directions_for_step(s) for s in range(n)]
    n_bw = sum("bw" in d for d in dirs)
    sd = math.sqrt(n * p * (1 - p))
    assert abs(n_bw - n * p) < 4 * sd, (n_bw, n * p, sd)
    if mode == "additional":
        assert all(d[0] == "fw" for d in dirs)                # fw every step, bw on top
        assert {d for d in dirs} == {("fw",), ("fw", "bw")}
    else:
        assert {d for d in dirs} == {("fw",), ("bw",)}        # one or the other
    # the coin depends on (bw_seed, step) only: a fresh model (another rank, a resumed run) agrees
    fresh = tiny(p_bw=p, bw_mode=mode, bw_seed=7)
    assert [fresh.directions_for_step(s) for s in range(n)] == dirs


def test_additional_sums_fw_and_bw_losses():
    m = tiny(p_bw=1.0)
    x, y = torch.randint(0, V - 2, (2, 8)), torch.randint(0, V - 2, (2, 8))
    loss, metrics = m.training_loss(x, y, None, 3)
    assert math.isclose(loss.item(), metrics["loss_fw"] + metrics["loss_bw"], rel_tol=1e-5)
    assert metrics["loss"] == metrics["loss_fw"]   # the logged loss is fw's, on bw steps too
    ex = tiny(p_bw=1.0, bw_mode="exclusive")
    loss, metrics = ex.training_loss(x, y, None, 3)
    assert math.isclose(loss.item(), metrics["loss_bw"], rel_tol=1e-6)   # trains bw only
    assert math.isclose(metrics["loss"], ex(x, y)[1].item(), rel_tol=1e-6)   # logs fw, computed on the side


def test_dynamic_p_bw_follows_the_seed_rule_and_survives_a_checkpoint():
    m = tiny(p_bw=1.0, dynamic_p_bw=True)
    m._sums = {"fw_sum": 2.0 * 2, "fw_n": 2, "bw_sum": 1.0 * 2, "bw_n": 2}   # mean fw 2.0, bw 1.0
    m.on_train_step(1, 100)
    assert math.isclose(m.p_bw_now, math.exp(1.0 - 2.0))                   # ppl_bw / ppl_fw
    m._sums = {"fw_sum": 1.0, "fw_n": 1, "bw_sum": 9.0, "bw_n": 1}
    m.on_train_step(2, 100)
    assert m.p_bw_now == 1.0                                                # clamped above
    m._sums = {"fw_sum": 9.0, "fw_n": 1, "bw_sum": 0.0, "bw_n": 1}
    m.on_train_step(3, 100)
    assert m.p_bw_now == 0.01                                               # clamped below
    m._sums = {"fw_sum": 3.0, "fw_n": 1, "bw_sum": 0.0, "bw_n": 0}
    m.on_train_step(4, 100)
    assert m.p_bw_now == 0.01                                               # no bw this step: unchanged
    other = tiny(p_bw=1.0, dynamic_p_bw=True)
    other.load_extra_state(m.extra_state())
    assert other.p_bw_now == 0.01 and other.log_fields() == {"p_bw": 0.01}
    static = tiny(p_bw=0.05)
    static._sums = {"fw_sum": 9.0, "fw_n": 1, "bw_sum": 0.0, "bw_n": 1}
    static.on_train_step(1, 100)
    assert static.p_bw_now == 0.05


def test_bad_config_is_a_clear_error():
    with pytest.raises(ModelConfigError):
        tiny(bw_mode="sometimes")
    with pytest.raises(ModelConfigError):
        tiny(p_bw=1.5)


def test_layer_cut_keeps_the_first_k_blocks():
    idx = torch.randint(0, V - 2, (2, 12))
    for d in ("fw", "bw"):
        m = tiny(n_layer=4)
        blocks = list(m.blocks)
        with torch.no_grad():
            # by hand: task token, embeddings, the first two blocks, ln_f, tied head
            tok = m.add_task_token(idx, d)
            pos = torch.arange(13) if d == "fw" else torch.arange(13).flip(0)
            h = m.wte(tok) + m.wpe(pos)
            for b in blocks[:2]:
                h = b(h, "causal" if d == "fw" else "anticausal")
            h = h[:, 1:] if d == "fw" else h[:, :-1]
            want = m.ln_f(h) @ m.wte.weight.t()
            full = m(idx, direction=d)[0]
            m.keep_first_blocks(2)
            got = m(idx, direction=d)[0]
        assert len(m.blocks) == 2 and all(a is b for a, b in zip(m.blocks, blocks[:2]))
        assert torch.allclose(got, want, atol=1e-5) and not torch.allclose(got, full, atol=1e-3)
    with pytest.raises(ValueError):
        m.keep_first_blocks(3)


def test_layer_cut_curve_goes_from_all_blocks_to_one():
    from dual_mask.layer_cuts import layer_cut_curve
    m = tiny(n_layer=3)
    x = torch.randint(0, V - 2, (2, 10))
    rows = layer_cut_curve(m, [(x, x.roll(-1, 1), None)])
    assert [r["layers"] for r in rows] == [3, 2, 1] and len(m.blocks) == 1
    assert all(math.isclose(r["ppl_fw"], math.exp(r["loss_fw"])) for r in rows)


def test_layer_cuts_weigh_each_batch_by_the_tokens_it_scores():
    """As the trainer's val rows (a token mean): with a loss mask, two batches scoring 6 and 1 answer tokens
    weigh 6 : 1, so the full-depth cut equals the token mean over both; it used to be the mean of the two means."""
    from dual_mask.layer_cuts import evaluate_directions
    m = tiny(n_layer=2).eval()
    torch.manual_seed(1)
    x = torch.randint(0, V - 2, (2, 2, 10))
    y = x.roll(-1, 2)
    mask = torch.zeros(2, 2, 10)
    mask[0, :, 2:5] = 1
    mask[1, 0, 7] = 1
    got = evaluate_directions(m, [(x[i], y[i], mask[i]) for i in range(2)])
    whole = m.evaluation_losses(x.view(4, 10), y.view(4, 10), mask.view(4, 10))
    assert math.isclose(got["loss_fw"], float(whole["loss_fw"]), rel_tol=1e-5)
    per_batch = [float(m.evaluation_losses(x[i], y[i], mask[i])["loss_fw"]) for i in range(2)]
    assert not math.isclose(got["loss_fw"], sum(per_batch) / 2, rel_tol=1e-3)


def test_ratio_averages_match_hand_computed_values():
    num = [[1.0, 2.0], [3.0, 4.0]]
    den = [[2.0, 2.0], [1.0, 4.0]]
    # mean_then_ratio: [(1+3)/2 / ((2+1)/2), (2+4)/2 / ((2+4)/2)] = [2/1.5, 1]
    assert np.allclose(mean_then_ratio(num, den), [4 / 3, 1.0])
    # ratio_then_mean: [(1/2 + 3/1)/2, (2/2 + 4/4)/2] = [1.75, 1]
    assert np.allclose(ratio_then_mean(num, den), [1.75, 1.0])
    with pytest.raises(ValueError):
        ratio_then_mean([[1.0]], [[1.0], [2.0]])


def _fake_run(seed, p, losses):
    val = {s: {"loss_fw": l, "loss_bw": l + 1} for s, l in zip((0, 10, 20), losses)}
    return {"val": val, "num_params": 1000, "seed": seed, "p_bw": p, "cuts": None}


def test_violin_samples_pair_seeds_and_respect_the_window():
    groups = {(2, 32): {0.0: {0: _fake_run(0, 0.0, [5, 4, 3]), 1: _fake_run(1, 0.0, [5, 2, 6])},
                        0.05: {0: _fake_run(0, 0.05, [5, 2, 4]), 1: _fake_run(1, 0.05, [5, 4, 2])}}}
    s = ratio1_samples(groups, 0.05, (0, 1))[(1000, (2, 32))]
    assert sorted(s) == sorted([4 / 2, 3 / 4, 2 / 4, 6 / 2])       # step 0 excluded, pairs by seed
    s = ratio1_samples(groups, 0.05, (0.6, 1))[(1000, (2, 32))]
    assert sorted(s) == sorted([3 / 4, 6 / 2])


def test_tiny_training_run_logs_both_directions_and_cuts(data_dir, tmp_path):
    from conftest import run_script, train_args
    out = tmp_path / "run"
    r = run_script("train_dual_mask_gpt.py", *train_args(
        data_dir, out, "--max-steps", 6, "--eval-interval", 3, "--eval-batches", 2, "--n-layer", 2,
        "--n-embd", 32, "--n-head", 2, "--p-bw", 0.5, "--seq-len", 64, "--micro-batch-size", 8,
        "--total-batch-size", 512, "--seed", 5), timeout=180)   # --seed 5: weights; the data seed stays 1337
    assert r.returncode == 0, r.stderr[-2000:]
    rows = [json.loads(line) for line in open(out / "metrics.jsonl")]
    val = [r for r in rows if r["split"] == "val"]
    train = [r for r in rows if r["split"] == "train"]
    assert [r["step"] for r in val] == [0, 3, 6]
    assert all({"loss_fw", "loss_bw", "acc_fw", "acc_bw"} <= set(r) for r in val)
    assert val[-1]["loss_fw"] < val[0]["loss_fw"] and val[-1]["loss"] == val[-1]["loss_fw"]
    assert [bool(r["bw_ran"]) for r in train] == [dm.bw_coin(0, s) < 0.5 for s in range(6)]   # bw_seed 0
    assert all(("loss_bw" in r) == bool(r["bw_ran"]) for r in train)
    # "loss" is the fw loss on every train row: no fw + bw square wave in plot_loss.py
    assert any(r["bw_ran"] for r in train) and all(r["loss"] == r["loss_fw"] for r in train)
    # layer cuts on the trained checkpoint: same numbers as the run's own final validation with all blocks
    # (the run's data seed and its --eval-batches batches, not data chosen by its weights' --seed)
    from dual_mask.layer_cuts import main as cuts_main
    assert cuts_main([str(out)]) == 0
    before = (out / "layer_cuts.json").read_bytes()
    assert cuts_main([str(out), "--batches", "1"]) == 2          # kept unless --overwrite
    assert (out / "layer_cuts.json").read_bytes() == before
    cuts = json.load(open(out / "layer_cuts.json"))
    assert [c["layers"] for c in cuts["cuts"]] == [2, 1]
    assert math.isclose(cuts["cuts"][0]["loss_fw"], val[-1]["loss_fw"], rel_tol=1e-4)
    assert math.isclose(cuts["cuts"][0]["loss_bw"], val[-1]["loss_bw"], rel_tol=1e-4)


def test_sweep_skips_finished_runs_and_resumes_partial_ones(tmp_path, capsys):
    from dual_mask import sweep as sw
    out = tmp_path / "sweep"
    done, partial = out / sw.run_name(2, 32, 0.0, 0), out / sw.run_name(2, 32, 0.05, 0)
    done.mkdir(parents=True)
    partial.mkdir()
    (done / sw.DONE_FILE).write_text("{}")
    (partial / "checkpoint.pt").write_text("")
    assert sw.main(["--out-dir", str(out), "--depths", "2", "--widths", "32", "--p-bw", "0", "0.05", "0.1",
                    "--seeds", "0", "--head-size", "16", "--dry-run", "--", "--max-steps", "5"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert "finished, skipped" in lines[0]
    assert "--resume" in lines[1] and "--p-bw 0.05" in lines[1] and "--n-head 2" in lines[1]
    assert "--resume" not in lines[2] and lines[2].endswith("--max-steps 5") and "--bw-seed 0" in lines[2]
    assert len(sw.grid([4, 8, 16, 32], [192, 384, 768, 1536], [0, 0.05, 0.1], [0, 1, 2])) == 144


def test_sweep_refuses_to_skip_a_finished_run_trained_with_other_settings(tmp_path, capsys):
    """A finished run is skipped by its name (depth, width, p_bw, seed): rerun with other settings (here
    --max-steps after --, or --bw-mode) it used to be skipped silently and sweep.json rewritten with the new
    settings, so the analysis described runs that were trained otherwise."""
    from dual_mask import sweep as sw
    out = tmp_path / "sweep"
    done = out / sw.run_name(2, 32, 0.0, 0)
    done.mkdir(parents=True)
    (done / sw.DONE_FILE).write_text(json.dumps(dict(depth=2, width=32, p_bw=0.0, seed=0, n_head=2, bw_mode="additional",
                                                     dynamic_p_bw=False, preset="rtx3080", train_args=["--max-steps", "5"])))
    common = ["--out-dir", str(out), "--depths", "2", "--widths", "32", "--p-bw", "0", "--seeds", "0",
              "--head-size", "16", "--dry-run"]
    for other in (["--", "--max-steps", "9"], ["--bw-mode", "exclusive", "--", "--max-steps", "5"]):
        capsys.readouterr()
        assert sw.main(common + other) == 2
        err = capsys.readouterr().err.splitlines()
        assert len(err) == 1 and err[0].startswith("error: ") and "trained with" in err[0], err
        assert sorted(os.listdir(out)) == [done.name]  # no sweep.json written
    assert sw.main(common + ["--", "--max-steps", "5"]) == 0
    assert "finished, skipped" in capsys.readouterr().out


def test_sweep_writes_its_files_by_rename_never_in_place(tmp_path, monkeypatch):
    """layer_cuts.json, sweep_run.json (the marker that makes the next sweep skip the run) and sweep.json were
    written in place: a kill mid-write left half a file under the name (a half marker: the next sweep refuses
    the run as unreadable). Now each goes to a temporary file in its folder, then os.replace names it."""
    from dual_mask import layer_cuts
    from dual_mask import sweep as sw
    out = tmp_path / "sweep"
    run = out / sw.run_name(2, 32, 0.0, 0)
    cuts = {"cuts": [{"layers": 2, "loss_fw": 1.0, "loss_bw": 2.0}]}

    def train(cmd, **kwargs):  # stands in for train_dual_mask_gpt.py: the config.json run_one reads afterwards
        run.mkdir(parents=True)
        (run / "config.json").write_text(json.dumps({"n_params": 123}))
        return 0
    renamed, real_replace = {}, os.replace

    def replace(src, dst):
        assert os.path.dirname(os.path.abspath(src)) == os.path.dirname(os.path.abspath(dst))
        with open(src) as f:
            renamed[os.path.relpath(dst, out)] = json.load(f)
        real_replace(src, dst)
    monkeypatch.setattr(sw.subprocess, "call", train)
    monkeypatch.setattr(layer_cuts, "evaluate_checkpoint", lambda *args, **kwargs: cuts)
    monkeypatch.setattr(os, "replace", replace)
    assert sw.main(["--out-dir", str(out), "--depths", "2", "--widths", "32", "--p-bw", "0", "--seeds", "0",
                    "--head-size", "16"]) == 0
    assert sorted(renamed) == sorted(["sweep.json", f"{run.name}/layer_cuts.json", f"{run.name}/{sw.DONE_FILE}"])
    assert renamed[f"{run.name}/layer_cuts.json"] == cuts
    assert renamed[f"{run.name}/{sw.DONE_FILE}"]["num_params"] == 123
    assert sorted(os.listdir(run)) == sorted(["config.json", "layer_cuts.json", sw.DONE_FILE])  # no .tmp left
    assert sorted(os.listdir(out)) == sorted(["sweep.json", run.name, run.name + ".log"])


def test_analysis_writes_every_plot(tmp_path):
    """Fake run folders (2 sizes x p_bw {0, 0.05} x 2 seeds) -> every PNG and the summary."""
    from dual_mask import analyze as an
    rng = np.random.default_rng(0)
    for d, w in ((2, 32), (4, 32)):
        for p in (0.0, 0.05):
            for seed in (0, 1):
                run = tmp_path / "runs" / f"d{d}_w{w}_p{p}_s{seed}"
                run.mkdir(parents=True)
                cfg = {"seed": seed, "n_params": 1000 * d, "max_steps": 100,
                       "model_config": {"n_layer": d, "n_embd": w, "p_bw": p, "bw_mode": "additional"}}
                (run / "config.json").write_text(json.dumps(cfg))
                rows = [{"step": s, "split": "val", "loss": 3 - s / 100, "loss_fw": 3 - s / 100 + rng.random() / 10,
                         "loss_bw": 4 - p * s / 10} for s in range(0, 101, 10)]
                (run / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
                cuts = [{"layers": k, "loss_fw": 2 + 1 / k, "loss_bw": 3 + 1 / k + p} for k in range(d, 0, -1)]
                (run / "layer_cuts.json").write_text(json.dumps({"cuts": cuts}))
    out = tmp_path / "plots"
    assert an.main([str(tmp_path / "runs"), "--out", str(out)]) == 0
    names = sorted(os.listdir(out))
    for want in ("val_loss_fw_bw_p0.05.png", "ratio1_val_loss_over_steps_p0.05.png",
                 "violin_ratio1_by_params_p0.05_0-1.png", "violin_ratio1_by_params_p0.05_0.5-1.png",
                 "cut_ratio1_fw_ppl_p0.05.png", "cut_ratio2_loss_p0.05.png", "cut_losses_p0.05.png", "summary.md"):
        assert want in names, names
    assert "| 4 | 32 |" in (out / "summary.md").read_text()
    # a folder that holds files is kept unless --overwrite; files this run did not write are named
    (out / "old_figure.png").write_bytes(b"old")
    before = {n: (out / n).read_bytes() for n in os.listdir(out)}
    assert an.main([str(tmp_path / "runs"), "--out", str(out)]) == 2
    assert {n: (out / n).read_bytes() for n in os.listdir(out)} == before
    assert an.main([str(tmp_path / "runs"), "--out", str(out), "--overwrite"]) == 0
    assert (out / "old_figure.png").exists()


def test_analysis_refuses_two_runs_of_the_same_setting_and_seed(tmp_path, capsys):
    """Two sweeps under one root (here the same run copied, with another p_bw=0 loss): the second used to
    replace the first silently in the grouping, so the ratios depended on the order os.walk met them."""
    from dual_mask import analyze as an
    for sweep, loss in (("a", 3.0), ("b", 2.0)):
        for p in (0.0, 0.05):
            run = tmp_path / "runs" / sweep / f"d2_w32_p{p}_s0"
            run.mkdir(parents=True)
            (run / "config.json").write_text(json.dumps({"seed": 0, "n_params": 1000, "max_steps": 10, "model_config": {
                "n_layer": 2, "n_embd": 32, "p_bw": p, "bw_mode": "additional"}}))
            (run / "metrics.jsonl").write_text(json.dumps({"step": 10, "split": "val", "loss": loss, "loss_fw": loss,
                                                           "loss_bw": loss + 1}) + "\n")
    assert an.main([str(tmp_path / "runs"), "--out", str(tmp_path / "plots")]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and "both depth 2, width 32, p_bw 0" in err[0] and "seed 0" in err[0], err
    assert not (tmp_path / "plots").exists()
    assert an.main([str(tmp_path / "runs" / "a"), "--out", str(tmp_path / "plots")]) == 0
