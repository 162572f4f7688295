"""
Plots and ratios of a dual-mask GPT sweep (the seed's analysis, on this project's run folders).

    python dual_mask/analyze.py runs/dm_tiny --out docs/dual_mask [--p-bw 0.05] [--windows 0:1 0:0.1 0.5:1]

A run folder is any folder below the given roots with config.json and metrics.jsonl from
train_dual_mask_gpt.py (layer_cuts.json from dual_mask/layer_cuts.py adds the cut plots). Runs are grouped by
(depth, width) and p_bw; the seeds of a group are its repetitions; ratio_then_mean pairs runs by seed.

The two ratios (the seed's definitions; "metric" is a validation loss unless said otherwise):
    ratio 1 = fw metric at p_bw = 0 / fw metric at p_bw = x   (> 1 for a loss: p_bw = x is better at fw)
    ratio 2 = fw metric / bw metric, both at one p_bw          (> 1 for a loss: the model is better at bw)
and the two ways of averaging over seeds:
    mean_then_ratio(a, b) = mean_s(a) / mean_s(b)             (squashes outliers)
    ratio_then_mean(a, b) = mean_s(a_s / b_s)                 (paired by seed; sensitive to outliers)

Output PNGs (x = the p_bw compared with 0, default 0.05):
    val_loss_fw_bw_p{x}.png                 fw and bw val loss over steps, p_bw = 0 vs x, one panel per size
    ratio1_val_loss_over_steps_p{x}.png     ratio 1 of the fw val loss over steps, both averages
    violin_ratio1_by_params_p{x}_{a}-{b}.png  ratio 1 (every seed pair, every val step in the window of
                                            training [a, b], step 0 excluded) by parameter count
    cut_ratio1_fw_ppl_p{x}.png              ratio 1 of fw val perplexity over the number of layers remaining
    cut_ratio2_loss_p{x}.png                ratio 2 (fw / bw val loss) at p_bw = x and 0 over layers remaining
    cut_losses_p{x}.png                     fw and bw val loss over layers remaining
and summary.md: final numbers per size (means over seeds, with the spread).
"""

import sys, pathlib; sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # run from anywhere: the repository root
from plumbing import ctrl_c  # noqa: F401  (first: Ctrl-C during the imports below is one line, exit 130)

import argparse
import json
import math
import os
import sys

import numpy as np

from plumbing import cli
from plot_loss import PlotError, is_number, read_metrics


# ---- the two averages (pure) --------------------------------------------------------------------

def mean_then_ratio(num, den):
    """num, den: (runs, points) -> mean over runs of num / mean over runs of den, per point."""
    num, den = np.asarray(num, dtype=float), np.asarray(den, dtype=float)
    return np.mean(num, axis=0) / np.mean(den, axis=0)


def ratio_then_mean(num, den):
    """num, den: (runs, points), row r of num paired with row r of den -> mean over runs of num / den."""
    num, den = np.asarray(num, dtype=float), np.asarray(den, dtype=float)
    if num.shape != den.shape:
        raise ValueError(f"ratio_then_mean pairs runs: shapes {num.shape} and {den.shape} differ")
    return np.mean(num / den, axis=0)


AVERAGES = {"mean_then_ratio": mean_then_ratio, "ratio_then_mean": ratio_then_mean}


# ---- loading runs -------------------------------------------------------------------------------

def load_run(run_dir):
    """A run folder's settings, val rows and layer cuts; ValueError (find_runs skips the folder with a note) when
    its files are not those of a train_dual_mask_gpt.py run."""
    cfg = read_json_object(os.path.join(run_dir, "config.json"))
    mc = cfg.get("model_config")
    if not (isinstance(mc, dict) and all(isinstance(mc.get(k), int) for k in ("n_layer", "n_embd"))
            and is_number(mc.get("p_bw")) and isinstance(cfg.get("seed"), int) and isinstance(cfg.get("n_params"), int)):
        raise ValueError("its config.json is not that of a train_dual_mask_gpt.py run (model_config's n_layer, "
                         "n_embd, p_bw; seed; n_params)")
    try:
        rows = read_metrics(run_dir)  # plot_loss.py's reader: a live run's incomplete last line is left out
    except PlotError as e:
        raise ValueError(str(e)) from None
    val = {r["step"]: r for r in rows if r.get("split") == "val" and "loss_fw" in r and "loss_bw" in r}
    cuts = None
    cut_file = os.path.join(run_dir, "layer_cuts.json")
    if os.path.exists(cut_file):
        cuts = read_json_object(cut_file).get("cuts")
        if not (isinstance(cuts, list) and all(isinstance(c, dict) and isinstance(c.get("layers"), int) and
                                               is_number(c.get("loss_fw")) and is_number(c.get("loss_bw"))
                                               for c in cuts)):
            raise ValueError(f"{cut_file} is not the output of dual_mask/layer_cuts.py; make it again (--overwrite)")
        cuts = {c["layers"]: c for c in cuts}
    return {"dir": run_dir, "depth": mc["n_layer"], "width": mc["n_embd"], "p_bw": float(mc["p_bw"]),
            "bw_mode": mc.get("bw_mode", "additional"), "dynamic": bool(mc.get("dynamic_p_bw", False)),
            "seed": cfg.get("seed"), "num_params": cfg.get("n_params"), "max_steps": cfg.get("max_steps"),
            "val": val, "cuts": cuts}


def read_json_object(path):
    """The JSON object in the file `path`; ValueError (UnicodeDecodeError and JSONDecodeError are ones) otherwise."""
    with open(path, encoding="utf-8") as f:
        value = json.load(f)
    if not isinstance(value, dict):
        raise ValueError(f"{path} holds a JSON {type(value).__name__}, not an object")
    return value


def find_runs(roots):
    runs = []
    for root in roots:
        for dirpath, _, files in os.walk(root):
            if "config.json" in files and "metrics.jsonl" in files:
                try:
                    run = load_run(dirpath)
                except (KeyError, ValueError, OSError) as e:
                    print(f"skip {dirpath}: {e}", file=sys.stderr)
                    continue
                if run["val"]:
                    runs.append(run)
    return runs


class AnalysisError(Exception):
    """Runs that cannot be compared; printed as one line."""


def group_runs(runs):
    """{(depth, width): {p_bw: {seed: run}}} for the additional, static runs (the seed's setting). Two runs with
    the same depth, width, p_bw and seed (e.g. two sweeps under one root) are an AnalysisError: keeping either
    one silently would make the figures depend on the order of the folders."""
    groups = {}
    for r in runs:
        if r["bw_mode"] != "additional" or r["dynamic"]:
            continue
        by_seed = groups.setdefault((r["depth"], r["width"]), {}).setdefault(r["p_bw"], {})
        if r["seed"] in by_seed:
            raise AnalysisError(f"{by_seed[r['seed']]['dir']} and {r['dir']} are both depth {r['depth']}, width "
                                f"{r['width']}, p_bw {r['p_bw']:g}, seed {r['seed']}; give the folder of one sweep")
        by_seed[r["seed"]] = r
    return groups


def curves(runs_by_seed, key, seeds=None, steps=None):
    """(steps, array (len(seeds), len(steps))) of val[key] over the common val steps of the runs."""
    seeds = sorted(runs_by_seed) if seeds is None else seeds
    if steps is None:
        steps = sorted(set.intersection(*(set(runs_by_seed[s]["val"]) for s in seeds)))
    return steps, np.array([[runs_by_seed[s]["val"][t][key] for t in steps] for s in seeds], dtype=float)


def paired(a_by_seed, b_by_seed, key_a, key_b=None, source="val"):
    """Seed-paired arrays of two run sets: (x values, A (seeds, n), B (seeds, n)).
    source "val": x = common val steps; source "cuts": x = common numbers of layers remaining."""
    key_b = key_b or key_a
    seeds = sorted(set(a_by_seed) & set(b_by_seed))
    if not seeds:
        return [], np.zeros((0, 0)), np.zeros((0, 0))
    runs = [a_by_seed[s] for s in seeds] + [b_by_seed[s] for s in seeds]
    if source == "cuts" and any(r["cuts"] is None for r in runs):
        return [], np.zeros((0, 0)), np.zeros((0, 0))
    xs = sorted(set.intersection(*(set(r[source]) for r in runs)))
    a = np.array([[a_by_seed[s][source][x][key_a] for x in xs] for s in seeds], dtype=float)
    b = np.array([[b_by_seed[s][source][x][key_b] for x in xs] for s in seeds], dtype=float)
    return xs, a, b


def with_ppl(runs):
    """Add ppl_fw / ppl_bw = exp(loss) to every val row (the trainer logs losses) and cut row lacking them."""
    for r in runs:
        for row in list(r["val"].values()) + list((r["cuts"] or {}).values()):
            for d in ("fw", "bw"):
                row.setdefault(f"ppl_{d}", math.exp(min(row[f"loss_{d}"], 50.0)))
    return runs


# ---- plots --------------------------------------------------------------------------------------

def _plt():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _grid(n):
    cols = min(n, 4)
    rows = -(-n // cols)
    return rows, cols


def fmt_params(n):
    return f"{n / 1e6:.2f}M" if n >= 1e6 else f"{n / 1e3:.0f}k"


def plot_fw_bw_losses(groups, x, path):
    plt = _plt()
    sizes = [k for k in sorted(groups) if 0.0 in groups[k] and x in groups[k]]
    rows, cols = _grid(len(sizes))
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.4 * rows), squeeze=False)
    for ax, size in zip(axes.flat, sizes):
        for p, color in ((0.0, "tab:blue"), (x, "tab:red")):
            for d, style in (("fw", "-"), ("bw", "--")):
                steps, ys = curves(groups[size][p], f"loss_{d}")
                for y in ys:
                    ax.plot(steps, y, style, color=color, alpha=0.2, lw=0.8)
                ax.plot(steps, ys.mean(0), style, color=color, label=f"p_bw={p:g} {d}")
        ax.set_title(f"depth {size[0]}, width {size[1]}")
        ax.set_xlabel("step")
        ax.set_ylabel("val loss")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(sizes):]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=7)
    fig.suptitle(f"fw (solid) and bw (dashed) val loss, p_bw = 0 vs {x:g}; thin: single seeds")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def plot_ratio1_over_steps(groups, x, path):
    plt = _plt()
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for size in sorted(groups):
        if 0.0 not in groups[size] or x not in groups[size]:
            continue
        steps, a, b = paired(groups[size][0.0], groups[size][x], "loss_fw")
        if not steps:
            continue
        line, = ax.plot(steps, mean_then_ratio(a, b), "-", label=f"d{size[0]} w{size[1]} mean_then_ratio")
        ax.plot(steps, ratio_then_mean(a, b), ":", color=line.get_color(), label="  ratio_then_mean")
    ax.axhline(1.0, color="k", lw=0.7)
    ax.set_xlabel("step")
    ax.set_ylabel(f"ratio 1: val loss fw (p_bw=0) / (p_bw={x:g})")
    ax.set_title("ratio 1 over training (> 1: the p_bw > 0 model is better at fw)")
    ax.legend(fontsize=7, ncol=2)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def ratio1_samples(groups, x, window):
    """{num_params: [ratio 1 of every seed pair at every val step t, 0 < t, a*T <= t <= b*T]}."""
    out = {}
    for size in sorted(groups):
        if 0.0 not in groups[size] or x not in groups[size]:
            continue
        steps, a, b = paired(groups[size][0.0], groups[size][x], "loss_fw")
        if not steps:
            continue
        last = max(steps)
        keep = [i for i, t in enumerate(steps) if t > 0 and window[0] * last <= t <= window[1] * last]
        n_params = next(iter(groups[size][x].values()))["num_params"]
        out[(n_params, size)] = (a[:, keep] / b[:, keep]).ravel().tolist()
    return out


def plot_violin(groups, x, window, path):
    plt = _plt()
    samples = {k: v for k, v in sorted(ratio1_samples(groups, x, window).items()) if v}
    if not samples:
        return False
    fig, ax = plt.subplots(figsize=(max(5, 1.6 * len(samples)), 4.5))
    ax.violinplot(list(samples.values()), showmedians=True)
    ax.set_xticks(range(1, len(samples) + 1))
    ax.set_xticklabels([f"{fmt_params(n)}\nd{s[0]} w{s[1]}" for n, s in samples], fontsize=8)
    ax.axhline(1.0, color="k", lw=0.7)
    ax.set_ylabel(f"ratio 1: val loss fw (p_bw=0) / (p_bw={x:g})")
    ax.set_title(f"ratio 1 by parameter count, steps {window[0]:g}-{window[1]:g} of training\n"
                 f"(every seed pair x val step)", fontsize=10)
    ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return True


def plot_cut_ratio(groups, pairs, key_num, key_den, ylabel, title, path):
    """One panel per average; one colour per size, one line style per entry of `pairs(group)`,
    which maps a label to the (numerator runs, denominator runs) of that size."""
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    styles = ["o-", "s--", "^:"]
    drawn = False
    for i, size in enumerate(sorted(groups)):
        color = f"C{i % 10}"
        for j, (label, (a_runs, b_runs)) in enumerate(pairs(groups[size]).items()):
            layers, a, b = paired(a_runs, b_runs, key_num, key_den, source="cuts")
            if not layers:
                continue
            drawn = True
            for ax, avg in zip(axes, AVERAGES.values()):
                ax.plot(layers, avg(a, b), styles[j % 3], ms=3, color=color,
                        label=f"d{size[0]} w{size[1]} {label}".strip())
    if not drawn:
        plt.close(fig)
        return False
    for ax, name in zip(axes, AVERAGES):
        ax.axhline(1.0, color="k", lw=0.7)
        ax.set_title(name)
        ax.set_xlabel("layers remaining")
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    axes[0].set_ylabel(ylabel)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return True


def plot_cut_losses(groups, x, path):
    plt = _plt()
    sizes = [k for k in sorted(groups) if 0.0 in groups[k] and x in groups[k]]
    rows, cols = _grid(len(sizes))
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.4 * rows), squeeze=False)
    drawn = False
    for ax, size in zip(axes.flat, sizes):
        for p, color in ((0.0, "tab:blue"), (x, "tab:red")):
            runs = [r for r in groups[size][p].values() if r["cuts"]]
            if not runs:
                continue
            drawn = True
            layers = sorted(set.intersection(*(set(r["cuts"]) for r in runs)))
            for d, style in (("fw", "-"), ("bw", "--")):
                ys = np.array([[r["cuts"][k][f"loss_{d}"] for k in layers] for r in runs])
                ax.plot(layers, ys.mean(0), style + "o", ms=3, color=color, label=f"p_bw={p:g} {d}")
        ax.set_title(f"depth {size[0]}, width {size[1]}")
        ax.set_xlabel("layers remaining")
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.set_ylabel("val loss")
        ax.grid(alpha=0.3)
    if not drawn:
        plt.close(fig)
        return False
    axes.flat[0].legend(fontsize=7)
    fig.suptitle("fw (solid) and bw (dashed) val loss after removing blocks from the back (mean over seeds)")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return True


# ---- summary ------------------------------------------------------------------------------------

def summary_rows(groups, x):
    rows = []
    for size in sorted(groups):
        if 0.0 not in groups[size] or x not in groups[size]:
            continue
        r0, rx = groups[size][0.0], groups[size][x]
        steps, a, b = paired(r0, rx, "loss_fw")
        _, bw0, bwx = paired(r0, rx, "loss_bw")
        if not steps:
            continue
        rows.append(dict(depth=size[0], width=size[1], num_params=next(iter(rx.values()))["num_params"],
                         seeds=a.shape[0], step=steps[-1],
                         fw0=a[:, -1].mean(), fw0_sd=a[:, -1].std(), fwx=b[:, -1].mean(), fwx_sd=b[:, -1].std(),
                         bw0=bw0[:, -1].mean(), bwx=bwx[:, -1].mean(), bwx_sd=bwx[:, -1].std(),
                         r1_mtr=mean_then_ratio(a[:, -1:], b[:, -1:])[0],
                         r1_rtm=ratio_then_mean(a[:, -1:], b[:, -1:])[0],
                         r2_mtr=mean_then_ratio(b[:, -1:], bwx[:, -1:])[0],
                         r2_rtm=ratio_then_mean(b[:, -1:], bwx[:, -1:])[0]))
    return rows


def write_summary(rows, x, path):
    lines = [f"Final validation losses (mean over seeds, sd in brackets) and ratios, p_bw = 0 vs {x:g}.",
             "ratio 1 = fw loss (p_bw=0) / fw loss (p_bw=x); ratio 2 = fw loss / bw loss at p_bw=x.", "",
             "| depth | width | params | seeds | step | fw p=0 | fw p=x | bw p=0 | bw p=x | ratio 1 (mtr / rtm) "
             "| ratio 2 (mtr / rtm) |", "|" + "---|" * 11]
    for r in rows:
        lines.append(f"| {r['depth']} | {r['width']} | {fmt_params(r['num_params'])} | {r['seeds']} | {r['step']} "
                     f"| {r['fw0']:.4f} ({r['fw0_sd']:.4f}) | {r['fwx']:.4f} ({r['fwx_sd']:.4f}) "
                     f"| {r['bw0']:.4f} | {r['bwx']:.4f} ({r['bwx_sd']:.4f}) "
                     f"| {r['r1_mtr']:.4f} / {r['r1_rtm']:.4f} | {r['r2_mtr']:.4f} / {r['r2_rtm']:.4f} |")
    text = "\n".join(lines) + "\n"
    with open(path, "w") as f:
        f.write(text)
    return text


def parse_window(text):
    a, b = text.split(":")
    return float(a), float(b)


def main(argv=None):
    p = cli.ArgumentParser(description=__doc__.split("\n\n")[0].strip(),
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("roots", nargs="+", help="folders holding run folders (searched recursively)")
    p.add_argument("--out", type=cli.output_dir, default="runs/dual_mask_analysis", help="where the PNGs and summary.md go (default "
                   "runs/dual_mask_analysis; docs/dual_mask holds the committed figures)")
    p.add_argument("--overwrite", action="store_true", help="write into an --out folder that already holds files")
    p.add_argument("--p-bw", type=cli.probability, default=0.05, help="the p_bw compared with p_bw = 0")
    p.add_argument("--windows", nargs="+", type=cli.window, default=["0:1", "0:0.2", "0.5:1"],
                   help="violin windows as fractions of training, start:stop (default 0:1 0:0.2 0.5:1)")
    args = p.parse_args(argv)
    if os.path.isdir(args.out) and os.listdir(args.out) and not args.overwrite:
        print(f"error: {args.out} already holds files; add --overwrite to replace them or choose another --out",
              file=sys.stderr)
        return 2
    runs = with_ppl(find_runs(args.roots))
    try:
        groups = group_runs(runs)
    except AnalysisError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    x = args.p_bw
    usable = [k for k in groups if 0.0 in groups[k] and x in groups[k]]
    print(f"{len(runs)} runs, {len(groups)} sizes, {len(usable)} with both p_bw = 0 and {x:g}")
    if not usable:
        print("error: no size has runs at both p_bw = 0 and --p-bw; nothing to compare", file=sys.stderr)
        return 1
    try:
        written, summary = write_analysis(groups, x, args.windows, args.out)
    except OSError as e:  # e.g. a full disk: the figures written before stay; the last one may be cut short
        print(f"error: could not write into {args.out} ({e.strerror or e}); free some space or choose another "
              f"--out", file=sys.stderr)
        return 1
    print(summary)
    print("wrote " + ", ".join(written) + " and summary.md to " + args.out)
    stale = sorted(set(os.listdir(args.out)) - set(written) - {"summary.md"})
    if stale:  # from an earlier analysis (another --p-bw or --windows): said, not deleted
        print(f"note: {args.out} also holds files this run did not write: {', '.join(stale)}")
    return 0


def write_analysis(groups, x, windows, folder):
    """Every figure and summary.md into `folder`; returns the names of the figures written and the summary."""
    os.makedirs(folder, exist_ok=True)
    out = lambda name: os.path.join(folder, name)
    written = []
    plot_fw_bw_losses(groups, x, out(f"val_loss_fw_bw_p{x:g}.png"))
    written.append(f"val_loss_fw_bw_p{x:g}.png")
    plot_ratio1_over_steps(groups, x, out(f"ratio1_val_loss_over_steps_p{x:g}.png"))
    written.append(f"ratio1_val_loss_over_steps_p{x:g}.png")
    for w in windows:
        window = parse_window(w)
        name = f"violin_ratio1_by_params_p{x:g}_{window[0]:g}-{window[1]:g}.png"
        if plot_violin(groups, x, window, out(name)):
            written.append(name)
    r1 = lambda g: {"": (g.get(0.0, {}), g.get(x, {}))}
    if plot_cut_ratio(groups, r1, "ppl_fw", "ppl_fw", f"ratio 1: fw val ppl (p_bw=0) / (p_bw={x:g})",
                      "ratio 1 of fw perplexity over layers remaining (> 1: p_bw > 0 better at fw)",
                      out(f"cut_ratio1_fw_ppl_p{x:g}.png")):
        written.append(f"cut_ratio1_fw_ppl_p{x:g}.png")
    r2 = lambda g: {f"p={pp:g}": (g[pp], g[pp]) for pp in (x, 0.0) if pp in g}
    if plot_cut_ratio(groups, r2, "loss_fw", "loss_bw", "ratio 2: val loss fw / bw",
                      "ratio 2 (fw / bw val loss, same runs) over layers remaining (> 1: better at bw)",
                      out(f"cut_ratio2_loss_p{x:g}.png")):
        written.append(f"cut_ratio2_loss_p{x:g}.png")
    if plot_cut_losses(groups, x, out(f"cut_losses_p{x:g}.png")):
        written.append(f"cut_losses_p{x:g}.png")
    return written, write_summary(summary_rows(groups, x), x, out("summary.md"))


if __name__ == "__main__":
    sys.exit(main())
