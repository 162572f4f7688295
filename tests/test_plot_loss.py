"""plot_loss.py with many runs: distinct styles, the legend outside the axes, plain tick labels, labelled stage
switches, smoothing, --fields, --x, and no overwrite without --overwrite."""

import json
import math

import pytest

from conftest import run_script


def fake_run(folder, i, stages=False, dual=False, steps=60):
    """A run folder with train rows every step and val rows every 10 steps; loss falls with the step."""
    folder.mkdir(parents=True)
    rows = []
    for s in range(steps):
        if s % 10 == 0:
            rows.append({"step": s, "split": "val", "loss": 5 / (1 + s / 20) + i / 50, "tokens": s * 1024,
                         **({"loss_fw": 5 / (1 + s / 20), "loss_bw": 6 - s / 100} if dual else {})})
        row = {"step": s, "split": "train", "loss": 5 / (1 + s / 20) + i / 50 + (0.3 if s % 2 else -0.3),
               "tokens": (s + 1) * 1024, "dt_ms": 100.0 + i}
        if stages:
            row["stage"] = 1 + s // 20
        if dual:
            row["loss_fw"] = row["loss"]
            if s % 3 == 0:
                row["loss_bw"] = 6 - s / 100
        rows.append(row)
    (folder / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return folder


@pytest.fixture(scope="module")
def fifteen_runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    return [fake_run(root / f"run{i:02d}", i, stages=(i == 3)) for i in range(15)]


def test_fifteen_runs_get_distinct_styles_an_outside_legend_and_plain_ticks(fifteen_runs):
    import plot_loss
    fig = plot_loss.make_figure(fifteen_runs)
    ax = fig.axes[0]
    lines = [ln for ln in ax.get_lines() if (ln.get_gid() or "").endswith(" val")]
    assert len(lines) == 15 and len(ax.get_legend().get_texts()) == 15     # one legend entry per run
    styles = {(ln.get_color(), ln.get_linestyle(), ln.get_marker()) for ln in lines}
    assert len(styles) == 15                                       # old code: C0..C9 then C0 again
    # the legend lies right of the axes, not on the curves
    fig.canvas.draw()
    legend_box = ax.get_legend().get_window_extent()
    assert legend_box.x0 >= ax.get_window_extent().x1
    # log axis, labelled with plain numbers ("2", "3", "5"), not 2x10^0
    assert ax.get_yscale() == "log"
    labels = [t.get_text() for t in ax.get_yticklabels(which="both") if t.get_text()]
    assert labels and all(lab.replace(".", "", 1).isdigit() for lab in labels), labels
    # stage switches of run03 (steps 20 and 40) are labelled
    notes = [t.get_text() for t in ax.texts]
    assert notes == ["run03: stage 2", "run03: stage 3"]
    assert len({plot_loss.series_style(i) for i in range(10 * 4 * 8)}) == 320


def test_smoothing_x_axes_and_fields(tmp_path):
    import plot_loss
    run = fake_run(tmp_path / "dual", 0, dual=True)
    fig = plot_loss.make_figure([run], x="steps", smooth=4, fields=("loss", "loss_bw"))
    curves = {ln.get_gid(): ln for ln in fig.axes[0].get_lines() if ln.get_gid()}
    assert set(curves) == {"dual loss train", "dual loss val", "dual loss_bw train", "dual loss_bw val"}
    raw = [json.loads(line) for line in open(run / "metrics.jsonl")]
    train = [r["loss"] for r in raw if r["split"] == "train"]
    smoothed = curves["dual loss train"].get_ydata()
    assert math.isclose(smoothed[10], sum(train[7:11]) / 4) and math.isclose(smoothed[0], train[0])
    assert list(curves["dual loss_bw train"].get_xdata()) == list(range(0, 60, 3))  # bw rows only
    # --x time: seconds of training (dt_ms summed); a val row at step s sits after s train steps
    fig = plot_loss.make_figure([run], x="time")
    val = next(ln for ln in fig.axes[0].get_lines() if (ln.get_gid() or "").endswith("val"))
    assert [round(v, 6) for v in val.get_xdata()] == [round(s * 0.1, 6) for s in range(0, 60, 10)]
    with pytest.raises(plot_loss.PlotError, match="loss_bw"):
        plot_loss.make_figure([fake_run(tmp_path / "plain", 1)], fields=("loss_bw",))


def test_command_line_writes_under_runs_and_keeps_an_existing_png(fifteen_runs, tmp_path):
    out = tmp_path / "sub" / "many.png"
    result = run_script("plot_loss.py", *fifteen_runs, "--out", out, "--smooth", 5)
    assert result.returncode == 0, result.stderr
    png = out.read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    result = run_script("plot_loss.py", *fifteen_runs[:2], "--out", out)
    assert result.returncode == 2 and "--overwrite" in result.stderr and len(result.stderr.splitlines()) == 1
    assert out.read_bytes() == png
    result = run_script("plot_loss.py", *fifteen_runs[:2], "--out", out, "--overwrite")
    assert result.returncode == 0 and out.read_bytes() != png
    help_text = run_script("plot_loss.py", "--help").stdout
    assert "runs/loss.png" in help_text


def test_an_out_without_extension_is_the_png_it_writes_and_an_unknown_format_is_refused_first(fifteen_runs, tmp_path):
    """matplotlib appends .png to a name without extension: "--out cmp" writes cmp.png, so cmp.png is the file that
    --overwrite protects (it used to be replaced silently) and the one the message names. A format matplotlib
    cannot write is refused before any run is read (it used to end in a traceback after the work)."""
    kept = tmp_path / "cmp.png"
    kept.write_bytes(b"an earlier plot")
    result = run_script("plot_loss.py", *fifteen_runs[:2], "--out", tmp_path / "cmp")
    assert result.returncode == 2 and "cmp.png already exists" in result.stderr, result.stderr
    assert len(result.stderr.splitlines()) == 1 and kept.read_bytes() == b"an earlier plot"
    result = run_script("plot_loss.py", *fifteen_runs[:2], "--out", tmp_path / "new" / "cmp.txt")
    assert result.returncode == 2 and ".txt" in result.stderr and len(result.stderr.splitlines()) == 1, result.stderr
    assert not (tmp_path / "new").exists()
    result = run_script("plot_loss.py", *fifteen_runs[:2], "--out", tmp_path / "fresh")
    assert result.returncode == 0 and f"wrote {tmp_path / 'fresh.png'}" in result.stdout, result.stdout
    assert (tmp_path / "fresh.png").read_bytes()[:4] == b"\x89PNG" and sorted(p.name for p in tmp_path.iterdir()) == \
        ["cmp.png", "fresh.png"]


def test_a_run_still_writing_its_last_row_is_plotted_without_it(tmp_path, capsys):
    """Users plot while a run trains: a last line without its newline (being written, or cut by a kill) is left
    out with a note; a bad line anywhere else is still refused."""
    import plot_loss
    run = fake_run(tmp_path / "live", 0)
    whole = plot_loss.read_metrics(run)
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"step": 60, "split": "tra')
    assert plot_loss.read_metrics(run) == whole
    assert "last line is incomplete" in capsys.readouterr().err
    (run / "metrics.jsonl").write_text('{"step": 0, "split": "tra\n' + (run / "metrics.jsonl").read_text())
    with pytest.raises(plot_loss.PlotError, match="line 1 is not JSON"):
        plot_loss.read_metrics(run)
