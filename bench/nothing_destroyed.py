"""
The "nothing destroyed" round: the reported ways a command lost or mixed files, and the inputs that gave
tracebacks, tried end to end as a user types them. Each case must end with a non-zero exit, one line on stderr,
no traceback, and every file it was pointed at unchanged (hashes of the whole scratch folder before and after).

    python bench/nothing_destroyed.py            # about a minute on a CPU; prints held / FAILED per case

Runs in a scratch folder (a copy of nothing: the scripts run from this checkout, their files go to the scratch).
"""

import hashlib
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TINY = ["--preset", "tiny", "--n-layer", "1", "--n-embd", "16", "--n-head", "2", "--max-steps", "2",
        "--eval-interval", "2", "--eval-batches", "1", "--max-tokens", "200k"]


def tree_hash(folder):
    """Every file under folder (names and contents), except the kernel-lock files, as one digest."""
    h = hashlib.sha256()
    for p in sorted(Path(folder).rglob("*")):
        if p.is_file() and p.name != ".lock":
            h.update(str(p.relative_to(folder)).encode() + b"\0" + p.read_bytes())
    return h.hexdigest()


def run(args, cwd, env=None):
    return subprocess.run([sys.executable, *map(str, args)], cwd=cwd, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})


def main():
    scratch = Path(tempfile.mkdtemp(prefix="nothing-destroyed-"))
    data, rundir = scratch / "data", scratch / "run"
    r = run([REPO / "train_baseline_gpt2.py", *TINY, "--data-dir", data, "--out-dir", rundir], REPO)
    assert r.returncode == 0, r.stderr
    (scratch / "bad.jsonl").write_bytes(b'{"question": "caf\xe9?", "answer": "#### 1"}\n')
    (scratch / "metrics_list").mkdir()
    (scratch / "metrics_list" / "metrics.jsonl").write_text('[1, 2]\n')
    (scratch / "metrics_bytes").mkdir()
    (scratch / "metrics_bytes" / "metrics.jsonl").write_bytes(b'{"step": 0, "split": "val", "loss": 1.0}\n\xff\xfe\n')
    import torch  # a checkpoint without its weights
    ckpt = torch.load(rundir / "checkpoint.pt", map_location="cpu", weights_only=True)
    del ckpt["model_state"]
    torch.save(ckpt, scratch / "no_weights.pt")
    (scratch / "folder_out").mkdir()
    (scratch / "folder_out" / "mine.txt").write_text("a file of the user's\n")
    train = [REPO / "train_baseline_gpt2.py", *TINY, "--data-dir", data, "--out-dir", rundir]
    cases = {
        "to-hf --out . --overwrite (the scratch folder)": [REPO / "convert_hf.py", "to-hf", "--checkpoint", rundir,
                                                          "--out", ".", "--overwrite"],
        "to-hf --out a folder of the user's --overwrite": [REPO / "convert_hf.py", "to-hf", "--checkpoint", rundir,
                                                          "--out", scratch / "folder_out", "--overwrite"],
        "to-hf --out the run folder itself --overwrite": [REPO / "convert_hf.py", "to-hf", "--checkpoint", rundir,
                                                         "--out", rundir, "--overwrite"],
        "from-hf --out an existing folder --overwrite": [REPO / "convert_hf.py", "from-hf", "--model",
                                                        scratch / "nowhere", "--out", scratch / "folder_out",
                                                        "--overwrite"],
        "--overwrite --n-embd 0": [*train, "--overwrite", "--n-embd", "0"],
        "--overwrite --n-head 0": [*train, "--overwrite", "--n-head", "0"],
        "--overwrite --threads 5000": [*train, "--overwrite", "--threads", "5000"],
        "--overwrite --lr 1e39": [*train, "--overwrite", "--lr", "1e39"],
        "--overwrite --optimizer muon --muon-lr 1e300": [*train, "--overwrite", "--optimizer", "muon",
                                                         "--muon-lr", "1e300"],
        "--overwrite --resume auto": [*train, "--overwrite", "--resume", "auto"],
        "train_dual_mask_gpt.py --bw-seed -1": [REPO / "train_dual_mask_gpt.py", *TINY, "--data-dir", data,
                                               "--out-dir", scratch / "dual", "--bw-seed", "-1"],
        "train_conv_attention.py --n-levels 10": [REPO / "train_conv_attention.py", *TINY[:2], "--max-steps", "2",
                                                 "--data-dir", data, "--out-dir", scratch / "conv",
                                                 "--n-levels", "10"],
        "base_data_preparer.py --max-tokens 1e40": [REPO / "base_data_preparer.py", "--data", "synthetic-math",
                                                   "--tokenizer", "bytes", "--data-dir", data, "--max-tokens",
                                                   "1e40"],
        "evaluate.py a non-UTF-8 json task": [REPO / "evaluate.py", "--checkpoint", rundir, "--task",
                                             f"json:{scratch / 'bad.jsonl'}", "--limit", "1"],
        "generate.py a checkpoint without model_state": [REPO / "generate.py", "--checkpoint",
                                                        scratch / "no_weights.pt", "--prompt", "1+1="],
        "plot_loss.py a metrics row that is a list": [REPO / "plot_loss.py", scratch / "metrics_list", "--out",
                                                     scratch / "a.png"],
        "plot_loss.py a non-UTF-8 metrics row": [REPO / "plot_loss.py", scratch / "metrics_bytes", "--out",
                                                scratch / "b.png"],
    }
    held = 0
    for name, args in cases.items():
        before = tree_hash(scratch)
        r = run(args, scratch)
        lines = [line for line in r.stderr.splitlines() if line.strip()]
        problems = []
        if r.returncode == 0:
            problems.append("exit 0")
        if "Traceback" in r.stderr:
            problems.append("a traceback")
        if len(lines) != 1:
            problems.append(f"{len(lines)} stderr lines")
        if tree_hash(scratch) != before:
            problems.append("files changed")
        held += not problems
        print(f"{'held  ' if not problems else 'FAILED'}  exit {r.returncode:3d}  {name}"
              + (f"  ({', '.join(problems)})" if problems else "") + f"\n        {lines[-1][:150] if lines else ''}")
    print(json.dumps({"cases": len(cases), "held": held, "failed": len(cases) - held}))


if __name__ == "__main__":
    main()
