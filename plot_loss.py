"""
Loss curves of many runs in one PNG: train (thin line) and val (markers) per run, log-scale loss.

    python plot_loss.py                                  # every runs/*/ that has a metrics.jsonl
    python plot_loss.py runs/baseline_gpt2 runs/conv_attention --out compare.png --x steps

Dotted vertical lines mark where a run's "stage" changes (progressive_diverging).
"""

import glob
import json
import os
import sys

import matplotlib

matplotlib.use("Agg")  # files only; no display needed
import matplotlib.pyplot as plt  # noqa: E402

import cli  # noqa: E402


class PlotError(Exception):
    pass


def read_metrics(run_dir):
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.isfile(path):
        raise PlotError(f"{run_dir} has no metrics.jsonl; pass run folders written by a train_<model>.py")
    rows = []
    with open(path) as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                raise PlotError(f"{path} line {n} is not JSON; is it a metrics file of lmsmall?") from None
    if not any(r.get("split") in ("train", "val") for r in rows):
        raise PlotError(f"{path} has no train or val rows yet; let the run log at least one step")
    return rows


def plot_runs(run_dirs, out, x="tokens", smooth=10):
    fig, ax = plt.subplots(figsize=(10, 6))
    for i, run_dir in enumerate(run_dirs):
        rows = read_metrics(run_dir)
        color = f"C{i % 10}"
        label = os.path.basename(os.path.normpath(run_dir))
        train = [r for r in rows if r.get("split") == "train"]
        val = [r for r in rows if r.get("split") == "val"]
        if train:
            xs = [r.get(x, r["step"]) for r in train]
            losses = [r["loss"] for r in train]
            # Running mean over `smooth` steps: single steps are noisy.
            smoothed = [sum(losses[max(0, j - smooth + 1): j + 1]) / len(losses[max(0, j - smooth + 1): j + 1])
                        for j in range(len(losses))]
            ax.plot(xs, smoothed, color=color, linewidth=1, alpha=0.8, label=f"{label} train")
            for prev, row in zip(train, train[1:]):
                if "stage" in row and row["stage"] != prev.get("stage"):
                    ax.axvline(row.get(x, row["step"]), color=color, linestyle=":", linewidth=1)
        if val:
            ax.plot([r.get(x, r["step"]) for r in val], [r["loss"] for r in val], color=color,
                    marker="o", markersize=4, linestyle="--", linewidth=1, label=f"{label} val")
    ax.set_yscale("log")
    ax.set_xlabel("tokens" if x == "tokens" else "optimizer steps")
    ax.set_ylabel("loss (nats/token)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)


def main(argv=None):
    p = cli.ArgumentParser(description="Plot train and val loss of lmsmall runs into one PNG.")
    p.add_argument("runs", nargs="*", help="run folders (default: every runs/*/ with a metrics.jsonl)")
    p.add_argument("--out", type=cli.output_file, default="loss.png")
    p.add_argument("--x", choices=["tokens", "steps"], default="tokens")
    p.add_argument("--smooth", type=cli.positive_int, default=10, help="running mean window for train loss")
    args = p.parse_args(argv)
    runs = args.runs or sorted(os.path.dirname(m) for m in glob.glob("runs/*/metrics.jsonl"))
    if not runs:
        print("error: no runs given and no runs/*/metrics.jsonl found; train a model first", file=sys.stderr)
        return 2
    try:
        plot_runs(runs, args.out, "tokens" if args.x == "tokens" else "step", max(1, args.smooth))
    except PlotError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {args.out} ({len(runs)} run(s))")
    return 0


if __name__ == "__main__":
    sys.exit(main())
