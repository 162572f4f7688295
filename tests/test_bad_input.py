"""Bad input to every script ends at the start: exit 2, ONE line on stderr naming the flag, no traceback, nothing
written. In-process (each main(argv)), so the whole table takes about a second."""

import importlib
import importlib.util
import os

import pytest
import torch

from conftest import REPO


NO_CUDA = not torch.cuda.is_available()


def train_main(argv):
    import base_trainer
    return base_trainer.main("baseline_gpt2", argv)


def finetune_main(argv):
    import finetune
    return finetune.run(finetune.FinetuneTrainer, argv)


def mntp_main(argv):
    import train_mntp
    return train_mntp.run(train_mntp.MNTPTrainer, argv, resolve=train_mntp.resolve)


def script_main(module):
    return lambda argv: importlib.import_module(module).main(argv)


def bench_main(name):
    def main(argv):
        spec = importlib.util.spec_from_file_location(f"bench_{name}", REPO / "bench" / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module.main(argv)
    return main


def cases(tmp):
    """(main, argv, the flag the one line must name). tmp/a_file exists and is a file."""
    f = str(tmp / "a_file")
    t = ["--preset", "tiny", "--out-dir", str(tmp / "run")]
    train = [(["--eval-interval", "0"], "--eval-interval"), (["--checkpoint-interval", "-1"], "--checkpoint-interval"),
             (["--max-steps", "0"], "--max-steps"), (["--eval-batches", "0"], "--eval-batches"),
             (["--micro-batch-size", "0"], "--micro-batch-size"), (["--seq-len", "-8"], "--seq-len"),
             (["--total-batch-size", "0"], "--total-batch-size"), (["--lr", "nan"], "--lr"), (["--lr", "-1"], "--lr"),
             (["--lr", "0"], "--lr"), (["--min-lr", "inf"], "--min-lr"), (["--weight-decay", "-0.1"], "--weight-decay"),
             (["--grad-clip", "nan"], "--grad-clip"), (["--grad-clip", "0"], "--grad-clip"),
             (["--warmup-steps", "-1"], "--warmup-steps"), (["--seed", "-1"], "--seed"),
             (["--data-seed", str(2 ** 32)], "--data-seed"), (["--device", "tpu"], "--device"),
             (["--max-tokens", "inf"], "--max-tokens"), (["--max-tokens", "0"], "--max-tokens"),
             (["--resume", "yes"], "--resume"), (["--skip-nonfinite", "-1"], "--skip-nonfinite"),
             (["--threads", "0"], "--threads"), (["--threads", "-1"], "--threads"),
             (["--dropout", "1.5"], "--dropout"), (["--dropout", "nan"], "--dropout"),
             (["--out-dir", f], "--out-dir"), (["--out-dir", f + "/sub"], "--out-dir")]
    if NO_CUDA:
        train.append((["--device", "cuda"], "--device"))
    out = [(train_main, t + argv, flag) for argv, flag in train]
    out += [(finetune_main, ["--checkpoint", "x.pt", "--lora-alpha", "nan"], "--lora-alpha"),
            (finetune_main, ["--checkpoint", "x.pt", "--lora-rank", "-1"], "--lora-rank"),
            (finetune_main, ["--checkpoint", "x.pt", "--lr", "1e999"], "--lr"),
            (mntp_main, ["--checkpoint", "x.pt", "--mask-rate", "1"], "--mask-rate"),
            (mntp_main, ["--checkpoint", "x.pt", "--mask-rate", "nan"], "--mask-rate")]
    gen = script_main("generate")
    out += [(gen, ["--checkpoint", "x.pt", *a], a[0]) for a in (["--max-new-tokens", "-1"], ["--top-k", "0"],
            ["--temperature", "nan"], ["--num-samples", "0"], ["--device", "gpu"], ["--seed", "-5"])]
    ev = script_main("evaluate")
    out += [(ev, ["--checkpoint", "x.pt", *a], a[0]) for a in (["--eval-batches", "0"], ["--limit", "0"],
            ["--max-new-tokens", "0"], ["--max-new-tokens", "-1"], ["--out", str(tmp)], ["--out", f + "/r.json"],
            ["--device", "cuda:x"])]
    cuts = script_main("dual_mask.layer_cuts")
    out += [(cuts, ["run", *a], a[0]) for a in (["--batches", "0"], ["--batch-size", "0"], ["--device", "foo"],
                                                ["--out", str(tmp)])]
    emb = script_main("embed")
    base = ["--checkpoint", "x.pt", "--input", "in.txt"]
    out += [(emb, base + ["--out", str(tmp / "e.npy"), "--batch-size", "0"], "--batch-size"),
            (emb, base + ["--out", str(tmp)], "--out"), (emb, base + ["--out", f + "/e.npy"], "--out"),
            (emb, base + ["--out", str(tmp / "e.npy"), "--device", "foo"], "--device")]
    plot = script_main("plot_loss")
    out += [(plot, ["run", "--smooth", "0"], "--smooth"), (plot, ["run", "--out", str(tmp)], "--out")]
    dual = script_main("dual_mask.analyze")
    out += [(dual, ["runs", "--p-bw", "2"], "--p-bw"), (dual, ["runs", "--windows", "1:0"], "--windows"),
            (dual, ["runs", "--out", f], "--out")]
    sweep = script_main("dual_mask.sweep")
    out += [(sweep, ["--jobs", "0"], "--jobs"), (sweep, ["--depths", "0"], "--depths"),
            (sweep, ["--p-bw", "-0.1"], "--p-bw"), (sweep, ["--out-dir", f], "--out-dir"),
            (sweep, ["--cut-batches", "0"], "--cut-batches")]
    prep = script_main("base_data_preparer")
    p = ["--data", "synthetic-math", "--tokenizer", "bytes", "--data-dir", str(tmp / "data")]
    out += [(prep, p + a, a[0]) for a in (["--max-tokens", "0"], ["--max-tokens", "nan"], ["--num-workers", "0"],
                                          ["--shard-tokens", "inf"], ["--seed", "-1"])]
    out += [(bench_main("generate"), ["--rounds", "0"], "--rounds"),
            (bench_main("throughput"), ["--steps", "0"], "--steps"),
            (bench_main("throughput"), ["--device", "abc"], "--device"),
            (bench_main("gpu_profile"), ["--micro", "0"], "--micro"),
            (bench_main("gpu_profile"), ["--model", "gpt5"], "--model"),
            (bench_main("gpu_speed"), ["table", "--models", "gpt5", "--runs", str(tmp / "runs")], "--models")]
    return out


def test_every_script_refuses_bad_input_in_one_line(tmp_path, capsys):
    (tmp_path / "a_file").write_text("not a folder")
    failures = []
    for main, argv, flag in cases(tmp_path):
        capsys.readouterr()
        try:
            code = main(argv)
        except SystemExit as e:
            code = e.code
        err = capsys.readouterr().err
        lines = [line for line in err.splitlines() if line.strip()]
        if code != 2 or len(lines) != 1 or not lines[0].startswith("error: ") or flag not in lines[0]:
            failures.append(f"{argv}: exit {code}, stderr {err!r}")
    assert not failures, "\n".join(failures)
    assert sorted(os.listdir(tmp_path)) == ["a_file"]  # nothing created: no run folder, no data, no output


@pytest.mark.parametrize("name", ["auto", "cpu"])
def test_pick_device_gives_a_usable_device(name):
    from plumbing import cli
    device = cli.pick_device(name)
    torch.zeros(1, device=device)
    assert device == "cpu" or name == "auto"


def test_cli_types():
    import argparse

    from plumbing import cli
    assert cli.count("2.5k") == 2500 and cli.positive_int("3") == 3 and cli.probability("1") == 1.0
    for fn, text in [(cli.positive_int, "0"), (cli.nonnegative_int, "-1"), (cli.positive_float, "nan"),
                     (cli.nonnegative_float, "-inf"), (cli.probability, "1.01"), (cli.open_fraction, "0"),
                     (cli.count, "1e400"), (cli.seed, "-1"), (cli.window, "0.5:0.5"), (cli.device, "cuda:-1")]:
        with pytest.raises(argparse.ArgumentTypeError):
            fn(text)


@pytest.mark.parametrize("module,model_name", [("evaluate", "baseline_gpt2"), ("generate", "baseline_gpt2"),
                                               ("embed", "baseline_gpt2"), ("dual_mask.layer_cuts", "dual_mask_gpt")])
def test_a_checkpoint_with_nan_weights_is_refused_in_one_line(module, model_name, tmp_path, capsys):
    """A nan weight makes every loss nan and every greedy answer junk: evaluate.py used to print 'test loss nan'
    and 0% accuracy with exit 0 (a wrong number, silently), generate.py ended in a traceback."""
    import dataclasses
    from checkpoint import CHECKPOINT_FORMAT
    from models import create_model
    model = create_model(model_name, preset="tiny", vocab_size=320, block_size=32, n_layer=2, n_head=2, n_embd=32)
    state = model.state_dict()
    state["ln_f.weight"] = state["ln_f.weight"].clone().fill_(float("nan"))
    ckpt = tmp_path / "checkpoint.pt"
    torch.save({"format": CHECKPOINT_FORMAT, "model_name": model.name, "model_config": dataclasses.asdict(model.config),
                "model_state": state, "model_extra_state": model.extra_state(), "config": {"tokenizer": "bytes"}}, ckpt)
    (tmp_path / "in.txt").write_text("What is 2 + 3?\n")
    argv = {"evaluate": ["--checkpoint", str(ckpt), "--out", str(tmp_path / "r.json")],
            "generate": ["--checkpoint", str(ckpt), "--prompt", "1 + 1 ="],
            "embed": ["--checkpoint", str(ckpt), "--input", str(tmp_path / "in.txt"), "--out", str(tmp_path / "e.npy")],
            "dual_mask.layer_cuts": [str(ckpt)]}[module]
    before = sorted(os.listdir(tmp_path))
    code = importlib.import_module(module).main(argv)
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert code in (1, 2) and len(lines) == 1 and "non-finite weights" in lines[0] and "ln_f.weight" in lines[0], lines
    assert sorted(os.listdir(tmp_path)) == before


@pytest.mark.parametrize("module,model_name,vocab_size", [
    ("evaluate", "baseline_gpt2", 200), ("generate", "baseline_gpt2", 200), ("embed", "baseline_gpt2", 200),
    ("convert_hf", "baseline_gpt2", 200), ("dual_mask.layer_cuts", "dual_mask_gpt", 258)])
def test_a_tokenizer_larger_than_the_models_vocabulary_is_refused_at_load(module, model_name, vocab_size, tmp_path,
                                                                           capsys):
    """A checkpoint whose recorded tokenizer has more ids than the model has token rows (bytes: 257; dual_mask_gpt
    also needs its 2 task tokens) ended in an IndexError traceback mid-run in generate, evaluate and embed (to-hf:
    a size-mismatch traceback). Now one line when the tools resolve the tokenizer, before any work."""
    import dataclasses
    from checkpoint import CHECKPOINT_FORMAT
    from models import create_model
    model = create_model(model_name, preset="tiny", vocab_size=vocab_size, block_size=32, n_layer=2, n_head=2,
                         n_embd=32)
    ckpt = tmp_path / "checkpoint.pt"
    torch.save({"format": CHECKPOINT_FORMAT, "model_name": model.name, "model_config": dataclasses.asdict(model.config),
                "model_state": model.state_dict(), "model_extra_state": model.extra_state(),
                "config": {"tokenizer": "bytes"}}, ckpt)
    (tmp_path / "in.txt").write_text("What is 2 + 3?\n")
    argv = {"evaluate": ["--checkpoint", str(ckpt), "--out", str(tmp_path / "r.json")],
            "generate": ["--checkpoint", str(ckpt)],  # the empty prompt starts with <|endoftext|>: id 256
            "embed": ["--checkpoint", str(ckpt), "--input", str(tmp_path / "in.txt"), "--out", str(tmp_path / "e.npy")],
            "convert_hf": ["to-hf", "--checkpoint", str(ckpt), "--out", str(tmp_path / "hf")],
            "dual_mask.layer_cuts": [str(ckpt)]}[module]
    before = sorted(os.listdir(tmp_path))
    capsys.readouterr()
    code = importlib.import_module(module).main(argv)
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert code in (1, 2) and len(lines) == 1 and "257 tokens" in lines[0] and f"only {vocab_size} token rows" in \
        lines[0], lines
    assert sorted(os.listdir(tmp_path)) == before


def test_a_run_folder_stands_for_its_checkpoint_in_every_tool(tmp_path, capsys):
    """evaluate/generate/embed said 'no checkpoint at RUN' for a run folder holding checkpoint.pt, while
    dual_mask/layer_cuts.py took folders: every tool now takes a run folder; one without checkpoint.pt: one line."""
    import dataclasses
    from checkpoint import CHECKPOINT_FORMAT, CheckpointError, load_checkpoint, load_model
    from models import create_model
    model = create_model("baseline_gpt2", preset="tiny", vocab_size=320, block_size=32, n_layer=1, n_head=2,
                         n_embd=32)
    run = tmp_path / "run"
    run.mkdir()
    torch.save({"format": CHECKPOINT_FORMAT, "model_name": model.name, "model_config": dataclasses.asdict(model.config),
                "model_state": model.state_dict(), "model_extra_state": model.extra_state(),
                "config": {"tokenizer": "bytes"}}, run / "checkpoint.pt")
    loaded, _ = load_model(str(run))
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), model.state_dict().values()))
    assert importlib.import_module("generate").main(["--checkpoint", str(run), "--prompt", "1 + 1 =",
                                                     "--max-new-tokens", "3"]) == 0
    with pytest.raises(CheckpointError, match="no checkpoint.pt in the folder"):
        load_checkpoint(str(tmp_path))
    capsys.readouterr()
    assert importlib.import_module("evaluate").main(["--checkpoint", str(tmp_path)]) == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1 and "no checkpoint.pt in the folder" in lines[0], lines


def one_line(capsys, main, argv, *words):
    """Run main(argv) in-process; assert exit 2 and one 'error:' line holding every word; return the line."""
    capsys.readouterr()
    try:
        code = main(argv)
    except SystemExit as e:
        code = e.code
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: "), (code, lines)
    for w in words:
        assert w in lines[0], lines[0]
    return lines[0]


def test_min_lr_above_lr_is_refused(tmp_path, capsys):
    """--lr 1e-4 with the tiny preset's min_lr 3e-4 made the cosine schedule climb from 1e-4 to 3e-4: refused."""
    run = tmp_path / "run"
    t = ["--preset", "tiny", "--out-dir", str(run), "--data-dir", str(tmp_path / "data")]
    one_line(capsys, train_main, t + ["--lr", "1e-4"], "--min-lr 0.0003", "preset", "--lr 0.0001")
    one_line(capsys, train_main, t + ["--lr", "1e-3", "--min-lr", "2e-3"], "--min-lr 0.002")
    assert os.listdir(tmp_path) == []  # checked before any data or run folder
