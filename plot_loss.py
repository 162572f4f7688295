"""
Loss curves of many runs in one PNG: per run, train loss (thin line) and val loss (thick line with markers).

    python plot_loss.py                                       # every runs/*/ with a metrics.jsonl -> runs/loss.png
    python plot_loss.py runs/baseline_gpt2 runs/conv_attention --out runs/compare.png --x steps
    python plot_loss.py runs/dual --fields loss loss_bw      # dual_mask_gpt: fw loss and bw loss as own curves
    python plot_loss.py ... --smooth 20 --x time --linear     # running mean of 20 train steps, seconds, linear y
    python plot_loss.py runs/sweep_pos --group                # sweep.py's runs: one curve per group of seeds

Each run (and each --fields entry) gets its own colour and line style (10 colours x 4 styles, then markers),
so any number of runs stay apart; the legend sits outside the axes. Vertical dotted lines, labelled, mark
where a run's "stage" changes (progressive_diverging). --x time is training time (the train rows' dt_ms
summed; evaluation not counted). --group finds the run folders under the given paths, groups the runs that differ
only in --seed (as compare.py does) and draws per group the mean val loss with a band from the lowest to the
highest run (train: the mean, thin). Re-running a command replaces its own default output (runs/loss.png); a
named --out that exists is kept unless --overwrite.
"""

from plumbing import ctrl_c  # noqa: F401  (first: Ctrl-C during the imports below is one line, exit 130)

import contextlib
import glob
import itertools
import json
import os
import sys

import matplotlib

matplotlib.use("Agg")  # files only; no display needed
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib import ticker  # noqa: E402
from matplotlib.backend_bases import FigureCanvasBase  # noqa: E402

COLORS = [f"C{i}" for i in range(10)]
LINESTYLES = ["-", "--", ":", "-."]
MARKERS = ["o", "s", "^", "D", "v", "P", "X", "*"]
X_LABELS = {"tokens": "tokens", "steps": "optimizer steps", "time": "training time (s, evaluation excluded)"}

from plumbing import cli  # noqa: E402


class PlotError(Exception):
    """Bad input; printed as one line (exit 2)."""


class WriteFailed(Exception):
    """The image could not be written (a full disk, say); printed as one line (exit 1)."""


def read_metrics(run_dir):
    """The rows of a run's metrics.jsonl; PlotError (one line) for a file that is not one. A last line without its
    newline (a live run writing it, or one cut by a kill) is left out with a note, whatever it holds."""
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.isfile(path):
        raise PlotError(f"{run_dir} has no metrics.jsonl; pass run folders written by a train_<model>.py")
    try:
        with open(path, "rb") as f:
            lines = f.readlines()
    except OSError as e:
        raise PlotError(f"cannot read {path} ({e.strerror or e})") from None
    rows = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line.decode("utf-8"))
            problem = row_problem(row)
        except (UnicodeDecodeError, json.JSONDecodeError):
            problem = "is not JSON text"
        if problem is None:
            rows.append(row)
        elif n == len(lines) and not line.endswith(b"\n"):
            print(f"note: {path}: the last line is incomplete (a run still writing it?); plotted without it",
                  file=sys.stderr)
        else:
            raise PlotError(f"{path} line {n} {problem}; is it a metrics file of lmsmall?")
    if not any(r.get("split") in ("train", "val") for r in rows):
        raise PlotError(f"{path} has no train or val rows yet; let the run log at least one step")
    return rows


def row_problem(row):
    """None for a metrics row this script can plot, else what is wrong with it: a train or val row needs a whole
    "step", and its losses, "tokens" and "dt_ms" must be numbers."""
    if not isinstance(row, dict):
        return f"is a JSON {type(row).__name__}, not an object"
    if row.get("split") not in ("train", "val"):
        return None  # test rows and others are not plotted
    if not isinstance(row.get("step"), int) or isinstance(row.get("step"), bool):
        return "has no whole number as its \"step\""
    for key, value in row.items():
        if (key.startswith("loss") or key in ("tokens", "dt_ms")) and not is_number(value):
            return f"has {json.dumps(value)} as its \"{key}\", not a number"
    return None


def is_number(value):
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def series_style(i):
    """The i-th curve's (colour, linestyle, marker): colours change fastest, then line styles, then markers,
    so 10 x 4 x 8 curves look different before any style repeats."""
    return (COLORS[i % 10], LINESTYLES[i // 10 % len(LINESTYLES)],
            MARKERS[i // (10 * len(LINESTYLES)) % len(MARKERS)])


def running_mean(values, window):
    out, total = [], 0.0
    for j, v in enumerate(values):
        total += v
        if j >= window:
            total -= values[j - window]
        out.append(total / min(j + 1, window))
    return out


def x_values(rows, x):
    """x of each row: tokens, step or training seconds (a val row at step s: the time after s train steps)."""
    if x == "steps":
        return [r["step"] for r in rows]
    if x == "tokens":
        return [r.get("tokens", r["step"]) for r in rows]
    seconds, elapsed = {}, 0.0
    for r in rows:
        if r.get("split") == "train":
            elapsed += r.get("dt_ms", 0.0) / 1000
            seconds[r["step"] + 1] = elapsed
    return [seconds.get(r["step"] + (r.get("split") == "train"), 0.0) for r in rows]


def plain_log_axis(ax):
    """Log-scale y with plain numbers (2, 3, 4) instead of 2x10^0; minor ticks labelled when they fit."""
    fmt = ticker.FuncFormatter(lambda v, _: f"{v:g}")
    ax.yaxis.set_major_formatter(fmt)
    low, high = ax.get_ylim()
    if high / low < 20:  # less than about a decade: more ticks, all labelled
        ax.yaxis.set_minor_locator(ticker.LogLocator(subs=(1.5, 2, 2.5, 3, 4, 5, 6, 7, 8, 9)))
        ax.yaxis.set_minor_formatter(fmt)
    else:
        ax.yaxis.set_minor_formatter(ticker.NullFormatter())


def image_path(out):
    """The file savefig would write for `out` (no extension: .png appended), or PlotError for a format that
    matplotlib cannot write: checked before any run is read."""
    ext = os.path.splitext(out)[1].lstrip(".").lower()
    formats = FigureCanvasBase.get_supported_filetypes()
    if not ext:
        return out + ".png"
    if ext not in formats:
        raise PlotError(f"--out {out}: matplotlib cannot write .{ext} files; end the name with one of "
                        f"{', '.join('.' + f for f in sorted(formats))}")
    return out


def plot_runs(run_dirs, out, x="tokens", smooth=1, fields=("loss",), log_y=True):
    out = image_path(out)
    save_figure(make_figure(run_dirs, x, smooth, fields, log_y), out)


def save_figure(fig, out):
    # The finished image appears at once, by rename, from a temporary file of our own (a hidden name with this
    # process's id, created here: removing it on failure removes nothing that was there before).
    tmp = os.path.join(os.path.dirname(out) or ".", f".{os.path.basename(out)}.{os.getpid()}.tmp")
    made = False
    try:
        os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
        with open(tmp, "xb") as f:
            made = True  # "tight": the legend outside the axes is kept
            fig.savefig(f, dpi=120, bbox_inches="tight", format=os.path.splitext(out)[1].lstrip(".").lower())
        os.replace(tmp, out)
        made = False
    except OSError as e:  # e.g. a full disk; an existing --out is left as it was
        raise WriteFailed(f"could not write {out} ({e.strerror or e}); no file was changed: free some space or "
                          f"choose another --out") from None
    finally:
        plt.close(fig)
        if made:
            with contextlib.suppress(OSError):
                os.remove(tmp)


def make_figure(run_dirs, x="tokens", smooth=1, fields=("loss",), log_y=True):
    fig, ax = plt.subplots(figsize=(11, 6))
    count, legend = itertools.count(), {}
    for run_dir in run_dirs:
        rows = read_metrics(run_dir)
        xs = x_values(rows, x)
        name = os.path.basename(os.path.normpath(run_dir))
        found = False
        for field in fields:
            color, linestyle, marker = series_style(next(count))
            label = name if list(fields) == ["loss"] else f"{name} {field}"
            odd = [r for r in rows if r.get("split") in ("train", "val") and field in r and not is_number(r[field])]
            if odd:
                raise PlotError(f"{run_dir}: the row of step {odd[0]['step']} has {json.dumps(odd[0][field])} as "
                                f"\"{field}\", not a number; choose --fields that hold numbers")
            train = [(xv, r[field]) for xv, r in zip(xs, rows) if r.get("split") == "train" and field in r]
            val = [(xv, r[field]) for xv, r in zip(xs, rows) if r.get("split") == "val" and field in r]
            found = found or bool(train or val)
            if train:
                losses = running_mean([v for _, v in train], smooth) if smooth > 1 else [v for _, v in train]
                legend[label] = ax.plot([xv for xv, _ in train], losses, color=color, linestyle=linestyle,
                                        linewidth=0.8, alpha=0.7, gid=f"{label} train")[0]
            if val:  # one legend entry per curve pair: the val line's style names both
                legend[label] = ax.plot([xv for xv, _ in val], [v for _, v in val], color=color,
                                        linestyle=linestyle, linewidth=1.8, marker=marker, markersize=4,
                                        gid=f"{label} val")[0]
        if not found:
            raise PlotError(f"{run_dir}: no train or val row has {' or '.join(fields)}; fields there: "
                            f"{', '.join(sorted({k for r in rows for k in r if k.startswith('loss')}))}")
        train_rows = [(xv, r) for xv, r in zip(xs, rows) if r.get("split") == "train"]
        for (_, prev), (xv, row) in zip(train_rows, train_rows[1:]):
            if "stage" in row and row["stage"] != prev.get("stage"):
                ax.axvline(xv, color="grey", linestyle=":", linewidth=1)
                ax.annotate(f"{name}: stage {row['stage']}", xy=(xv, 0.99), xycoords=("data", "axes fraction"),
                            rotation=90, fontsize=7, va="top", ha="right", color="dimgrey")
    if log_y:
        ax.set_yscale("log")
        plain_log_axis(ax)
    ax.set_xlabel(X_LABELS[x])
    ax.set_ylabel("loss (nats/token)" + (", log scale" if log_y else ""))
    ax.grid(True, which="both", alpha=0.3)
    title = "thin: train" + (f" (mean of {smooth} steps)" if smooth > 1 else "") + "\nthick + markers: val"
    ax.legend(list(legend.values()), list(legend), fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0),
              borderaxespad=0.0, handlelength=4, ncol=1 + len(legend) // 40, title=title, title_fontsize=7)
    return fig


def same_curves(a, b):
    """Whether two groups' {split: (xs, means)} are equal up to rounding (the means are sums of floats)."""
    return all(a[k][0] == b[k][0] and all(abs(u - v) <= 1e-9 * max(1.0, abs(u)) for u, v in zip(a[k][1], b[k][1]))
               for k in a)


def make_group_figure(paths, x="tokens", log_y=True):
    """One curve per group of runs that differ only in the seed: the mean, and a min-max band over the runs (val);
    the legend names each group, its number of runs and parameters; a curve equal to an earlier one says so."""
    import compare
    try:
        groups = compare.group_runs([compare.load_run(d) for d in compare.find_runs(paths)])
    except compare.CompareError as e:
        raise PlotError(str(e)) from None
    fig, ax = plt.subplots(figsize=(11, 6))
    drawn, handles, labels, tokens, data = [], [], [], set(), set()
    for i, group in enumerate(groups):
        color, linestyle, marker = series_style(i)
        curves = {"train": [], "val": []}
        for run in group["runs"]:
            rows = read_metrics(run["dir"])
            for split in curves:
                curves[split].append({r["step"]: (xv, r["loss"]) for xv, r in zip(x_values(rows, x), rows)
                                      if r.get("split") == split and is_number(r.get("loss"))})
            tokens.add(max((r.get("tokens", 0) for r in rows if is_number(r.get("tokens"))), default=0))
            data.add(f"{run['config'].get('data', '?')} ({run['config'].get('tokenizer', '?')} tokenizer)")
        means = {}
        for split, per_run in curves.items():  # the steps every run of the group has logged
            steps = sorted(set.intersection(*[set(c) for c in per_run])) if per_run else []
            xs = [per_run[0][s][0] for s in steps]
            values = [[c[s][1] for c in per_run] for s in steps]
            means[split] = (xs, [sum(v) / len(v) for v in values])
            if split == "train" and xs:
                ax.plot(xs, means[split][1], color=color, linestyle=linestyle, linewidth=0.8, alpha=0.7,
                        gid=f"{group['name']} train")
            elif xs:
                ax.fill_between(xs, [min(v) for v in values], [max(v) for v in values], color=color, alpha=0.15,
                                linewidth=0, gid=f"{group['name']} band")
        same = next((name for name, m in drawn if same_curves(m, means)), None)
        label = f"{group['name']} (n={len(group['runs'])}"
        label += f", {group['n_params']:,} params)" if isinstance(group["n_params"], int) else ")"
        if same is not None:  # drawn on top of an earlier curve: say so, and dash it so both stay visible
            label += f" (same as {same})"
            linestyle = "--"
        xs, ys = means["val"]
        handles.append(ax.plot(xs, ys, color=color, linestyle=linestyle, linewidth=1.8, marker=marker,
                               markersize=4, gid=f"{group['name']} val")[0])
        labels.append(label)
        drawn.append((group["name"], means))
    if log_y:
        ax.set_yscale("log")
        plain_log_axis(ax)
    ax.set_xlabel(X_LABELS[x])
    ax.set_ylabel("loss (nats/token)" + (", log scale" if log_y else ""))
    ax.grid(True, which="both", alpha=0.3)
    tokens_text = f"{max(tokens):,}" if len(tokens) == 1 else f"{min(tokens):,} to {max(tokens):,}"
    ax.set_title(f"data: {', '.join(sorted(data))}; {tokens_text} training tokens per run", fontsize=9)
    ax.legend(handles, labels, fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0,
              handlelength=4, title="per group of seeds: thick = mean val,\nband = min..max val, thin = mean train",
              title_fontsize=7)
    return fig


def main(argv=None):
    p = cli.ArgumentParser(description="Plot train and val loss of lmsmall runs into one PNG.")
    p.add_argument("runs", nargs="*", help="run folders (default: every runs/*/ with a metrics.jsonl)")
    p.add_argument("--out", type=cli.output_file, help="the PNG to write (default runs/loss.png, replaced by the next "
                   "plot that writes it)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing named --out")
    p.add_argument("--group", action="store_true", help="one curve per group of runs that differ only in --seed "
                   "(found under the given folders): the mean with a min-max band")
    p.add_argument("--x", choices=list(X_LABELS), default="tokens", help="x axis (default tokens)")
    p.add_argument("--smooth", type=cli.positive_int, default=1, help="running mean over this many train steps (default 1: "
                   "none); val rows are never smoothed")
    p.add_argument("--fields", nargs="+", default=["loss"], help="metrics to plot, one curve each (default "
                   "loss; e.g. loss loss_bw for dual_mask_gpt's backward loss, loss_all with --loss-on answer)")
    p.add_argument("--linear", action="store_true", help="linear y axis instead of log")
    args = p.parse_args(argv)
    runs = args.runs or sorted(os.path.dirname(m) for m in glob.glob("runs/*/metrics.jsonl"))
    if args.group and not args.runs and os.path.isdir("runs"):
        runs = ["runs"]  # every run folder under runs/, also sweep.py's deeper ones
    if not runs:
        print("error: no runs given and no runs/*/metrics.jsonl found; train a model first", file=sys.stderr)
        return 2
    if args.smooth < 1:
        print(f"error: --smooth {args.smooth}: give a window of 1 (no smoothing) or more steps", file=sys.stderr)
        return 2
    try:
        out = image_path(args.out or "runs/loss.png")  # "runs/cmp" is written as runs/cmp.png: the file not to replace
        if args.out and os.path.exists(out) and not args.overwrite:
            raise PlotError(f"{out} already exists; add --overwrite to replace it or choose another --out")
        if args.group:
            fig = make_group_figure(runs, args.x, not args.linear)
            what = fig.axes[0].get_legend().get_texts()
            save_figure(fig, out)
            print(f"wrote {out} ({len(what)} group(s))")
            return 0
        else:
            plot_runs(runs, out, args.x, args.smooth, args.fields, not args.linear)
    except PlotError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except WriteFailed as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"wrote {out} ({len(runs)} run(s))")
    return 0


if __name__ == "__main__":
    sys.exit(main())
