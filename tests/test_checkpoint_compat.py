"""Checkpoints written before the redesign still load and resume to the same losses.

tests/fixtures/checkpoint_v1_<optimizer>/ holds a run folder (checkpoint.pt, config.json, metrics.jsonl) that the
code of commit 90d9bff wrote: a 1-layer, 16-wide baseline_gpt2 on synthetic-math (200k tokens, bytes), 2 steps,
with AdamW and with Muon (which then orthogonalised q/k/v as one matrix). expected_after_resume.jsonl holds the
rows that same old code logged when it resumed the run to step 4. Made with, in a checkout of 90d9bff:

    python train_baseline_gpt2.py --preset tiny --n-layer 1 --n-embd 16 --n-head 2 --max-steps 2 --eval-interval 2 \\
        --checkpoint-interval 2 --eval-batches 1 --max-tokens 200k --optimizer OPT --data-dir D --out-dir F
    (copy F), then the same with --max-steps 4 --resume
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
FIXTURES = REPO / "tests" / "fixtures"


def rows(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
def test_a_checkpoint_of_the_old_code_resumes_to_the_same_losses(optimizer, tmp_path):
    fixture = FIXTURES / f"checkpoint_v1_{optimizer}"
    run = tmp_path / "run"
    run.mkdir()
    for name in ("checkpoint.pt", "config.json", "metrics.jsonl"):
        shutil.copy(fixture / name, run / name)
    old_rows = rows(run / "metrics.jsonl")
    r = subprocess.run([sys.executable, "train_baseline_gpt2.py", "--out-dir", str(run), "--resume", "--max-steps", "4",
                        "--data-dir", str(tmp_path / "data")], cwd=REPO, capture_output=True, text=True, timeout=300,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-2000:]
    got = rows(run / "metrics.jsonl")
    assert got[:len(old_rows)] == old_rows  # the old rows are kept as they were
    new, expected = got[len(old_rows):], rows(fixture / "expected_after_resume.jsonl")
    assert [(e["step"], e["split"]) for e in new] == [(e["step"], e["split"]) for e in expected]
    for row, want in zip(new, expected):
        for key in ("loss", "lr", "grad_norm", "bpb", "tokens"):
            if key in want:
                assert row[key] == pytest.approx(want[key], rel=1e-6, abs=1e-9), (row["step"], row["split"], key)
