"""The bench/ scripts, run with their smallest settings so that they cannot rot (their figures are not checked).

bench/data.py runs whole with --tiny (bytes tokenizer only, small budgets); bench/synthetic_distinct.py with --tiny.
"""

import json
import os

from conftest import REPO, TINY_TOKENS, run_script
from models import MODELS

SEED_MODELS = ["baseline_gpt2", "conv_attention", "progressive_diverging"]


def ok(result):
    assert result.returncode == 0, f"exit {result.returncode}\n{result.stdout[-2000:]}\n{result.stderr[-3000:]}"
    return result.stdout


def rows_of(out, name):
    """The table rows of model `name` (not the seed's reference rows, marked "(seed)")."""
    return [line for line in out.splitlines() if line.startswith(name + " ") and "(seed)" not in line]


def test_throughput_prints_a_row_per_model():
    out = ok(run_script("bench/throughput.py", "--batch", 2, "--seq-len", 64, "--steps", 1, "--rounds", 1,
                        timeout=120))
    assert "ms/step" in out and "tok/s" in out and "GFLOP/tok" in out
    for name in MODELS:  # bench/throughput.py times every registered model
        assert len(rows_of(out, name)) == 1, out


def test_gpu_profile_takes_a_step_apart_on_the_cpu():
    """bench/gpu_profile.py at toy sizes (its GPU-only parts, the kernel table, are skipped on a CPU)."""
    out = ok(run_script("bench/gpu_profile.py", "--preset", "tiny", "--micro", 2, "--vocab", 320, "--repeat", 1,
                        "--no-compile", "--device", "cpu", timeout=120))
    for part in ("step (fwd+bwd, eager)", "trunk (blocks, fwd+bwd)", "head chunked", "head F.cross_entropy"):
        assert part in out, out


def test_gpu_profile_times_both_compiled_head_chunks_side_by_side():
    """--head-only: the chunked head eager, then compiled with this code's chunk and the previous one."""
    out = ok(run_script("bench/gpu_profile.py", "--preset", "tiny", "--micro", 2, "--vocab", 320, "--repeat", 1,
                        "--head-only", "--device", "cpu", timeout=300))
    assert "head compiled, scatter, before 11-28" in out and "head compiled, this code" in out, out
    assert "step (fwd+bwd" not in out, out


def test_generate_cached_and_uncached_for_every_model():
    out = ok(run_script("bench/generate.py", "--smoke", "--new-tokens", 8, timeout=120))
    assert "machine: CPU" in out and "ms/token" in out and "cache speedup" in out
    for name in ["baseline_gpt2", "dual_mask_gpt"]:
        cache_col = sorted(line.split()[-5] for line in rows_of(out, name))
        assert cache_col == ["off", "on"], out
    conv = rows_of(out, "conv_attention")
    assert len(conv) == 1 and "no KV cache" in conv[0] and " off " in conv[0], out
    prog = rows_of(out, "progressive_diverging")
    assert len(prog) == 4 and sum("unmerged" in line for line in prog) == 2, out
    # greedy decoding: the cached path gives the uncached path's tokens
    assert all(line.split()[-1] == "yes" for line in out.splitlines() if " on " in line and "x " in line), out


def test_data_bench_tiny():
    out = ok(run_script("bench/data.py", "--tiny", timeout=120))
    assert "Preparation" in out and "tok/CPU-s" in out and "synthetic-math" in out and "GSM8K" in out, out
    assert "us/batch" in out and "file-backed" in out, out


def test_synthetic_distinct_tiny():
    out = ok(run_script("bench/synthetic_distinct.py", "--tiny", timeout=60))
    assert "the first 2,000 problems" in out and "distinct p" in out and "train twins" in out, out
    rows = [line.split("|") for line in out.splitlines() if line.startswith("| ") and "family" not in line]
    assert len(rows) == 9 and rows[-1][1].strip() == "all", out  # 8 families + all
    assert all(r[-2].strip() == "0" for r in rows), out  # no val/test problem has a train twin


def test_reproduce_seed_table_smallest(data_dir, tmp_path):
    out_dir = tmp_path / "runs"
    out = ok(run_script("bench/reproduce_seed_table.py", "--scale", "smoke", "--data-dir", data_dir,
                        "--max-tokens", TINY_TOKENS, "--out-dir", out_dir, "--max-steps", 2,
                        "--total-batch-size", 256, "--eval-batches", 1, "--infer-tokens", 4,
                        "--train-args", "--micro-batch-size", 2, "--seq-len", 64, timeout=240))
    assert "final train loss" in out and "test loss" in out and "bpb" in out and "infer ms/tok" in out
    for name in SEED_MODELS:
        row = rows_of(out, name)
        assert len(row) == 1, out
        assert "2 / 4" in row[0], row  # 2 optimizer steps of 256 tokens = 4 micro-batches of 2 x 64
        with open(out_dir / name / "config.json") as f:
            assert json.load(f)["seq_len"] == 64
    assert "same data, 512 training tokens per model" in out, out
    # The same command again: the runs exist, so it refuses instead of overwriting them.
    again = run_script("bench/reproduce_seed_table.py", "--scale", "smoke", "--out-dir", out_dir, timeout=60)
    assert again.returncode == 2 and "--overwrite" in again.stderr and "Traceback" not in again.stderr


def test_eval_speed_tiny():
    gsm8k = REPO.parent / "shared" / "data" / "gsm8k" / "train.jsonl"
    out = ok(run_script("bench/eval_speed.py", "--tiny", "--gsm8k", gsm8k, timeout=180))
    assert "problems/s" in out and "batched answers == one-at-a-time answers: 6 of 6" in out, out
    assert "old (1 at a time" in out and "batch 4" in out and "Part 2: 8 records" in out and "wall time" in out, out


def test_retrieval_seeds_keeps_finished_stages_and_tests_the_questions(tmp_path, monkeypatch, capsys):
    """bench/retrieval_seeds.py without training anything: a stage recorded in timings.json is not run again and
    keeps the cost it had; the summary averages the seeds' tables and gives each question a Welch test."""
    import importlib.util
    spec = importlib.util.spec_from_file_location("retrieval_seeds", REPO / "bench" / "retrieval_seeds.py")
    rs = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(rs)
    ran = []

    def fake_stage(script, args, log_path):
        ran.append(script)
        if script == "bench/retrieval.py":  # a table whose figures differ by seed
            seed = int(os.path.basename(os.path.dirname(log_path))[4:])
            rows = [{"kind": k, "scoring": s, "recall@1": 0.0, "recall@10": 0.1 * seed + (k == "mntp + simcse") / 10,
                     "mrr": 0.05 * seed} for k in ("causal", "causal + simcse", "mntp", "mntp + simcse", "dual")
                    for s in ("pooled", "pooled, centered")]
            with open(args[args.index("--out") + 1], "w") as f:
                json.dump({"n": 141, "rows": rows}, f)
        return 7.0, 5.0

    monkeypatch.setattr(rs, "run_stage", fake_stage)
    data = tmp_path / "pairs.jsonl"
    data.write_text("")
    seed1 = tmp_path / "out" / "seed1"
    seed1.mkdir(parents=True)
    (seed1 / "timings.json").write_text(json.dumps({"causal": {"wall_s": 53.0, "cpu_s": 49.0}}))
    assert rs.main(["--seeds", "1", "2", "--out-dir", str(tmp_path / "out"), "--data", str(data)]) == 0
    out = capsys.readouterr().out
    assert "seed 1 | causal: finished earlier (53 s wall, 49 s CPU then)" in out
    assert ran.count("train_baseline_gpt2.py") == 1 and ran.count("train_simcse.py") == 4   # seed 2's causal only
    assert json.loads((seed1 / "timings.json").read_text())["causal"] == {"wall_s": 53.0, "cpu_s": 49.0}
    assert "| causal | 30 ± 33 s | 27 ± 31 s |" in out          # seed 1's recorded cost and seed 2's new one
    row = next(line for line in out.splitlines() if line.startswith("| mntp + simcse, pooled | mntp, pooled | recall@10"))
    assert "| +0.100 (-0.204 .. +0.404) | 0.293 |" in row   # +0.1 in each seed, against a seed spread of 0.1
